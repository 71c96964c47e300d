"""Tiny Gemma 3 checkpoints built locally, with the real architecture rules (for tests and the embedded model).

Rules kept: one global layer every 6 (starting local), QK-norm, tied embeddings, two RoPE bases (1e6 global,
1e4 local), a sliding window smaller than the context, ``query_pre_attn_scalar = head_dim`` (llama.cpp applies
``1/sqrt(head_dim)`` whatever the config says), hidden and FFN sizes multiples of 32 (Q4_0 blocks).
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import torch

from gemma3_qat.models import layer_types
from gemma3_qat.embedded.sentencepiece import train_sentencepiece
from gemma3_qat.tokenizer import CONTROL_TOKENS


def tiny_text_config(vocab_size: int, *, hidden: int = 64, ffn: int = 128, layers: int = 6, heads: int = 2,
                     kv_heads: int = 1, head_dim: int = 32, sliding_window: int = 8, context: int = 512):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        sliding_window=sliding_window,
        max_position_embeddings=context,
        query_pre_attn_scalar=head_dim,
        layer_types=layer_types(layers),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def tiny_multimodal_config(vocab_size: int, image_token_index: int, boi: int, eoi: int, **text_kwargs):
    """A 4B-style ``Gemma3ForConditionalGeneration`` config with a small SigLIP tower (56 px, patch 14, 4 tokens)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    text = tiny_text_config(vocab_size, **text_kwargs)
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=86,  # 86: like SigLIP's 4304, not a multiple of 32
        num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14, vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=image_token_index, boi_token_index=boi, eoi_token_index=eoi, tie_word_embeddings=True,
    )


def sample_texts(modules: tuple[str, ...] = ("json", "argparse", "collections", "textwrap", "string", "functools")):
    """Deterministic-enough text for a fixture tokenizer: the sources of a few standard-library modules."""
    import importlib

    lines: list[str] = []
    for name in modules:
        lines += inspect.getsource(importlib.import_module(name)).splitlines(keepends=True)
    return ["".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, texts=None) -> Path:
    out = Path(out_dir)
    train_sentencepiece(texts if texts is not None else sample_texts(), out, vocab_size=vocab_size)
    return out


def build_tiny_checkpoint(out_dir: str | Path, tokenizer_dir: str | Path, *, multimodal: bool = False,
                          seed: int = 0, dtype: torch.dtype = torch.float32, **text_kwargs) -> Path:
    """Save a randomly initialised tiny Gemma 3 (text-only or multimodal) with its tokenizer files."""
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    from gemma3_qat.tokenizer import load_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(tokenizer_dir) / name, out / name)
    tok = load_tokenizer(out)
    vocab = len(tok)
    torch.manual_seed(seed)
    if multimodal:
        ids = {t: tok.convert_tokens_to_ids(t) for t in CONTROL_TOKENS}
        config = tiny_multimodal_config(vocab, ids["<image_soft_token>"], ids["<start_of_image>"],
                                        ids["<end_of_image>"], **text_kwargs)
        model = Gemma3ForConditionalGeneration(config)
    else:
        model = Gemma3ForCausalLM(tiny_text_config(vocab, **text_kwargs))
    model.to(dtype).save_pretrained(out)
    return out
