"""A Gemma checkpoint's SentencePiece vocabulary, from ``tokenizer.model`` or from ``tokenizer.json`` alone.

Runtimes want SentencePiece's view of a tokenizer: pieces, scores and types (llama.cpp's GGUF vocabulary,
gemma.cpp's ``ModelProto``). Many checkpoints ship only the HF files (transformers 5's ``save_pretrained``
writes no ``tokenizer.model``), so the view is derived from ``tokenizer.json`` when needed:

* **pieces** are the BPE model's vocabulary, in id order (Gemma's tokenizer.json is a conversion of the
  SentencePiece model: same pieces, ``▁`` for spaces, ``<0xNN>`` byte pieces);
* **scores**: SentencePiece's BPE (and llama.cpp's ``llm_tokenizer_spm``) merges the adjacent pair whose
  concatenation scores highest; HF's BPE merges the pair of lowest rank in ``merges``. A piece scores minus
  the rank of the first merge that yields it, so both pick the same merge (the file lists every split of
  every multi-character piece, checked: no piece is reachable by a concatenation HF would not merge). Pieces
  no merge yields (characters, bytes, control tokens) are never merge results: they score below every merge;
* **types**: ``<0xNN>`` BYTE; the added-token table (``tokenizer_config.json``'s ``added_tokens_decoder``, else
  ``tokenizer.json``'s ``added_tokens``) types special tokens CONTROL (``<unk>`` UNKNOWN), others USER_DEFINED
  (HF splits them out of the raw text first, as llama.cpp does with USER_DEFINED), everything else NORMAL.
  Except the whitespace runs ``▁▁`` … (ids 138–167 in Gemma 3): HF never matches those added tokens (its
  input has spaces, not ``▁``) and makes them by merges, which it decodes to spaces; typed NORMAL they are
  made and decoded the same way in llama.cpp (USER_DEFINED pieces print verbatim: ``▁▁-A`` for ``  -A``).

With both files present the pieces must agree (else a one-line ``InputError``); ``tokenizer.model`` then
supplies the scores and types as Google wrote them. Added tokens past the base vocabulary (Gemma 3's
``<image_soft_token>`` at 262,144) are listed apart in ``added_beyond``: whether they fit is the embedding's
question (``exporters/gguf_vocab.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from gemma3_qat.errors import InputError, MissingFileError

# SentencePiece's (and GGUF's) token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # ▁, SentencePiece's escaped space
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class AddedToken:
    id: int
    content: str
    special: bool


@dataclass
class SentencePieceVocab:
    """The base vocabulary (ids ``0 … len(pieces)-1``) and the added tokens past it."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    source: str  # the file the pieces came from
    added: list[AddedToken] = field(default_factory=list)  # the whole added-token table, by id

    def __post_init__(self):
        if not (len(self.pieces) == len(self.scores) == len(self.types)):
            raise InputError(f"{self.source}: {len(self.pieces)} pieces, {len(self.scores)} scores and "
                             f"{len(self.types)} types; the vocabulary is inconsistent")

    @property
    def added_beyond(self) -> list[AddedToken]:
        """Added tokens whose id lies past the base vocabulary (Gemma 3: ``<image_soft_token>``)."""
        return [t for t in self.added if t.id >= len(self.pieces)]


def added_tokens(checkpoint_dir: str | Path) -> list[AddedToken]:
    """The added-token table, sorted by id: ``tokenizer_config.json``'s ``added_tokens_decoder`` (what
    transformers loads), else ``tokenizer.json``'s ``added_tokens``."""
    path = Path(checkpoint_dir)
    config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
    table = config.get("added_tokens_decoder")
    if table:
        out = [AddedToken(int(i), t["content"], bool(t.get("special"))) for i, t in table.items()]
    elif (path / "tokenizer.json").exists():
        out = [AddedToken(int(t["id"]), t["content"], bool(t.get("special")))
               for t in _read_json(path / "tokenizer.json").get("added_tokens", [])]
    else:
        out = []
    return sorted(out, key=lambda t: t.id)


def read_sentencepiece_vocab(checkpoint_dir: str | Path) -> SentencePieceVocab:
    """The checkpoint's vocabulary: from ``tokenizer.model`` (checked against ``tokenizer.json`` when both are
    present), else derived from ``tokenizer.json``; a one-line ``MissingFileError`` when there is neither."""
    path = Path(checkpoint_dir)
    model, hf = path / "tokenizer.model", path / "tokenizer.json"
    if model.exists():
        vocab = vocab_from_tokenizer_model(model)
        if hf.exists():
            check_agree(vocab, _hf_pieces(_read_json(hf), hf), hf)
    elif hf.exists():
        vocab = vocab_from_tokenizer_json(hf)
    else:
        raise MissingFileError(f"{path} has neither tokenizer.model nor tokenizer.json: copy the base "
                               "checkpoint's tokenizer files next to config.json")
    vocab.added = added_tokens(path)
    _type_added(vocab)
    return vocab


def vocab_from_tokenizer_model(path: Path) -> SentencePieceVocab:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError: a truncated or foreign file
        raise InputError(f"{path} is not a SentencePiece model ({e}); copy it again from the base checkpoint")
    return SentencePieceVocab([p.piece for p in proto.pieces], [float(p.score) for p in proto.pieces],
                              [int(p.type) for p in proto.pieces], str(path))


def vocab_from_tokenizer_json(path: Path) -> SentencePieceVocab:
    """Pieces, scores and types of a SentencePiece-style BPE ``tokenizer.json`` (byte fallback, ``▁`` spaces)."""
    data = _read_json(path)
    model = data.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise InputError(f"{path}: a {model.get('type')!r} model without byte fallback is not a Gemma "
                         "(SentencePiece BPE) tokenizer; use the tokenizer files of a Gemma 3 checkpoint")
    pieces = _hf_pieces(data, path)
    ids = {p: i for i, p in enumerate(pieces)}
    first_rank: dict[int, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = ids.get(left + right)
        if i is not None and i not in first_rank:
            first_rank[i] = rank
    floor = -float(len(model.get("merges", [])) + 1)  # below every merge: never preferred
    scores = [-float(first_rank[i]) if i in first_rank else floor for i in range(len(pieces))]
    types = [BYTE if _BYTE_PIECE.fullmatch(p) else NORMAL for p in pieces]
    return SentencePieceVocab(pieces, scores, types, str(path))


def check_agree(vocab: SentencePieceVocab, hf_pieces: list[str], hf_path: Path) -> None:
    """``tokenizer.model`` and ``tokenizer.json`` describe the same pieces, or a one-line ``InputError``."""
    if hf_pieces == vocab.pieces:
        return
    if len(hf_pieces) != len(vocab.pieces):
        where = f"{len(vocab.pieces):,} pieces in tokenizer.model, {len(hf_pieces):,} in tokenizer.json"
    else:
        i = next(k for k, (a, b) in enumerate(zip(vocab.pieces, hf_pieces)) if a != b)
        where = f"id {i} is {vocab.pieces[i]!r} in tokenizer.model, {hf_pieces[i]!r} in tokenizer.json"
    raise InputError(f"{hf_path.parent}: tokenizer.model and tokenizer.json disagree ({where}); keep the pair "
                     "of the checkpoint they came from, or delete the stale one")


def _type_added(vocab: SentencePieceVocab) -> None:
    """Type the added tokens that lie in the base vocabulary (see the module docstring)."""
    for token in vocab.added:
        i = token.id
        if i >= len(vocab.pieces):
            continue
        if vocab.pieces[i] != token.content:
            raise InputError(f"tokenizer_config.json says id {i} is {token.content!r} but {Path(vocab.source).name} "
                             f"has {vocab.pieces[i]!r}; the tokenizer files do not belong together")
        if token.special:
            vocab.types[i] = CONTROL  # <unk> too, as llama.cpp's converter types it
        elif token.content.strip(SPACE) == "":
            vocab.types[i] = NORMAL  # whitespace runs: made by merges and decoded to spaces (docstring)
        else:
            vocab.types[i] = USER_DEFINED


def sentencepiece_model_proto(vocab: SentencePieceVocab, *, unk_id: int = 3, bos_id: int = 2, eos_id: int = 1,
                              pad_id: int = 0) -> bytes:
    """A serialized SentencePiece ``ModelProto`` of the base vocabulary, set up as Gemma's: BPE with byte
    fallback, identity normalization, no dummy prefix, whitespace kept (what gemma.cpp's ``.sbs`` embeds).

    SentencePiece never makes a CONTROL piece from text, so the added tokens other than pad/eos/bos become
    USER_DEFINED (matched in the text first, longest first: HF's added-token split; Google's own model types
    ``<start_of_turn>`` so); ``<unk>`` is UNKNOWN, as SentencePiece requires one.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(vocab.pieces, vocab.scores, vocab.types)):
        if i == unk_id:
            kind = UNKNOWN
        elif kind == CONTROL and i not in (bos_id, eos_id, pad_id):
            kind = USER_DEFINED
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    t = proto.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = len(vocab.pieces)
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = unk_id, bos_id, eos_id, pad_id
    for name, i in (("unk_piece", unk_id), ("bos_piece", bos_id), ("eos_piece", eos_id), ("pad_piece", pad_id)):
        setattr(t, name, vocab.pieces[i])
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = False
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return proto.SerializeToString()


def _hf_pieces(data: dict, path: Path) -> list[str]:
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise InputError(f"{path} has no BPE vocabulary (model.vocab); use the tokenizer files of a Gemma 3 "
                         "checkpoint")
    pieces = [None] * len(vocab)
    for piece, i in vocab.items():
        if not 0 <= i < len(pieces) or pieces[i] is not None:
            raise InputError(f"{path}: the vocabulary's ids are not 0..{len(pieces) - 1} (id {i}); the file is "
                             "damaged: copy it again")
        pieces[i] = piece
    return pieces


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); copy it again from the base checkpoint")
