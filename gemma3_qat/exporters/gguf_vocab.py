"""A Gemma checkpoint's SentencePiece tokenizer as GGUF vocabulary metadata (``tokenizer.ggml.*``).

Pieces, scores and types come from ``tokenizer.model``, or from ``tokenizer.json`` alone (``gemma3_qat.vocab``:
how, and why llama.cpp then tokenizes and detokenizes like HF); the special-token table of
``tokenizer_config.json`` (``added_tokens_decoder``) types each special token CONTROL and every other added
token USER_DEFINED (whitespace runs NORMAL), so that ``<start_of_turn>`` / ``<end_of_turn>`` are single control
tokens in llama.cpp (Google's first QAT GGUF typed ``<start_of_turn>`` NORMAL and it tokenized into 7 pieces).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType
from gemma3_qat.errors import InputError
from gemma3_qat.vocab import read_sentencepiece_vocab


@dataclass
class GGUFVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    eot_id: int | None  # <end_of_turn>: end of generation in chat
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _token_id(name: str | dict | None, ids: dict[str, int], default: int) -> int:
    if isinstance(name, dict):
        name = name.get("content")
    return ids.get(name, default) if name else default


def read_vocab(checkpoint_dir: str | Path, n_rows: int) -> GGUFVocab:
    """The vocabulary for an embedding of ``n_rows`` rows (padded with UNUSED ``[PAD…]`` tokens if larger).

    Added tokens past the rows are left out, as llama.cpp's ``convert_hf_to_gguf.py`` does ("ignore token:
    id is out of range"): no row could embed them. Gemma 3's ``<image_soft_token>`` (id 262,144) is one of
    them in the text-only sizes: the text ``<image_soft_token>`` then tokenizes as plain text in llama.cpp,
    where HF gives the id 262,144 that the model itself cannot embed. A base vocabulary larger than the rows is
    refused: those pieces belong to another model.
    """
    path = Path(checkpoint_dir)
    sp = read_sentencepiece_vocab(path)
    if len(sp.pieces) > n_rows:
        raise InputError(f"{path}: the tokenizer's base vocabulary has {len(sp.pieces):,} pieces but the "
                         f"embedding only {n_rows:,} rows; the tokenizer belongs to another model: copy the "
                         "base checkpoint's tokenizer files")
    tokens, scores, types = list(sp.pieces), list(sp.scores), list(sp.types)
    for token in sp.added:
        if token.id < len(sp.pieces):
            if types[token.id] != int(TokenType.NORMAL) and not token.special:
                scores[token.id] = -1000.0
            continue
        if token.id >= n_rows:
            continue  # out of range (see above)
        missing = token.id - len(tokens)  # added beyond the base vocabulary: fill the gap, then append
        tokens += [f"[PAD{len(tokens) + k}]" for k in range(missing)]
        scores += [-1000.0] * missing
        types += [int(TokenType.UNUSED)] * missing
        tokens.append(token.content)
        scores.append(-1000.0)
        types.append(int(TokenType.CONTROL if token.special else TokenType.USER_DEFINED))
    for i in range(len(tokens), n_rows):  # HF multimodal configs pad the embedding (262,208 rows)
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))

    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    chat_template = config.get("chat_template")
    if chat_template is None and (path / "chat_template.jinja").exists():
        chat_template = (path / "chat_template.jinja").read_text()
    eot = ids.get("<end_of_turn>")
    return GGUFVocab(
        tokens=tokens, scores=scores, types=types,
        bos_id=_token_id(config.get("bos_token"), ids, 2),
        eos_id=_token_id(config.get("eos_token"), ids, 1),
        unk_id=_token_id(config.get("unk_token"), ids, 3),
        pad_id=_token_id(config.get("pad_token"), ids, 0),
        eot_id=eot,
        add_bos=bool(config.get("add_bos_token", True)),
        add_eos=bool(config.get("add_eos_token", False)),
        chat_template=chat_template if isinstance(chat_template, str) else None,
    )


def add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model("llama")  # SentencePiece
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_pad_token_id(vocab.pad_id)
    if vocab.eot_id is not None:
        writer.add_eot_token_id(vocab.eot_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
