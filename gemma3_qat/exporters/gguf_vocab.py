"""A Gemma checkpoint's SentencePiece tokenizer as GGUF vocabulary metadata (``tokenizer.ggml.*``).

Pieces, scores and types come from ``tokenizer.model``; the special-token table of ``tokenizer_config.json``
(``added_tokens_decoder``) then types each special token CONTROL and every other added token USER_DEFINED, so
that ``<start_of_turn>`` / ``<end_of_turn>`` are single control tokens in llama.cpp (Google's first QAT GGUF typed
``<start_of_turn>`` NORMAL and it tokenized into 7 pieces).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType
from gemma3_qat.errors import InputError


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
    """The vocabulary for an embedding of ``n_rows`` rows (padded with UNUSED ``[PAD…]`` tokens if larger)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    path = Path(checkpoint_dir)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((path / "tokenizer.model").read_bytes())
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's numbering is GGUF's: NORMAL 1 ... BYTE 6

    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    for id_str, token in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        i = int(id_str)
        if i >= len(tokens):  # added beyond the SentencePiece model: fill the gap, then append
            missing = i - len(tokens)
            tokens += [f"[PAD{len(tokens) + k}]" for k in range(missing)]
            scores += [-1000.0] * missing
            types += [int(TokenType.UNUSED)] * missing
            tokens.append(token["content"])
            scores.append(-1000.0)
            types.append(0)
        elif tokens[i] != token["content"]:
            raise InputError(
                f"tokenizer_config.json says id {i} is {token['content']!r} but tokenizer.model has {tokens[i]!r}; "
                "the tokenizer files do not belong together"
            )
        types[i] = int(TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED)
        if not token.get("special"):
            scores[i] = -1000.0

    if len(tokens) > n_rows:
        raise InputError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_rows} rows")
    for i in range(len(tokens), n_rows):  # HF multimodal configs pad the embedding (262,208 rows)
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))

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
