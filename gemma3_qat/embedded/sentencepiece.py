"""Build a Gemma-style SentencePiece tokenizer locally: ``tokenizer.model``, ``tokenizer.json``, HF config files.

Used for the test fixtures and the embedded default model. The files written are what a Gemma 3 checkpoint
holds: ``tokenizer.model`` (SentencePiece, BPE with byte fallback, like Gemma's), ``tokenizer.json`` (the fast
tokenizer transformers loads) and ``tokenizer_config.json`` with ``added_tokens_decoder`` (the special-token
table a GGUF exporter needs) and the chat template.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

from gemma3_qat.tokenizer import BOS, CHAT_TEMPLATE, CONTROL_TOKENS, EOS, PAD, SPECIAL_IDS, UNK, load_tokenizer


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train a Gemma-style SentencePiece BPE model on ``texts``; write ``tokenizer.model`` and the HF files."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # any byte is representable, as in Gemma
        character_coverage=1.0,
        pad_id=SPECIAL_IDS[PAD], eos_id=SPECIAL_IDS[EOS], bos_id=SPECIAL_IDS[BOS], unk_id=SPECIAL_IDS[UNK],
        pad_piece=PAD, eos_piece=EOS, bos_piece=BOS, unk_piece=UNK,
        user_defined_symbols=list(CONTROL_TOKENS),
        add_dummy_prefix=False,  # Gemma: no space prefix
        remove_extra_whitespaces=False,  # code keeps its indentation
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        num_threads=2,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    write_hf_tokenizer_files(out)
    return out / "tokenizer.model"


def write_hf_tokenizer_files(out_dir: str | Path) -> None:
    """Write ``tokenizer_config.json`` (special-token table, chat template) and ``tokenizer.json`` next to
    ``tokenizer.model``."""
    import sentencepiece as spm

    out = Path(out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    specials = {**SPECIAL_IDS, **{t: sp.piece_to_id(t) for t in CONTROL_TOKENS}}
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for t, i in sorted(specials.items(), key=lambda kv: kv[1])
    }
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "mask_token": "<mask>",
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1_000_000,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}, indent=2) + "\n"
    )
    # Convert once with transformers' own SentencePiece converter and store the fast tokenizer, so that loading
    # later needs neither the conversion nor protobuf.
    tokenizer_json = out / "tokenizer.json"
    tokenizer_json.unlink(missing_ok=True)
    tok = load_tokenizer(out)
    tok.backend_tokenizer.save(str(tokenizer_json))
