"""Test fixtures: tiny Gemma 3 checkpoints built locally with the real architecture rules, and random-weight
models at real shapes with Google's tokenizer. Tests and benchmarks only: nothing in ``gemma3_qat`` imports this.

Rules kept: one global layer every 6 (starting local), QK-norm, tied embeddings, two RoPE bases (1e6 global,
1e4 local), a sliding window smaller than the context, ``query_pre_attn_scalar = head_dim`` (llama.cpp applies
``1/sqrt(head_dim)`` whatever the config says), hidden and FFN sizes multiples of 32 (Q4_0 blocks).
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import torch

from gemma3_qat.models import Architecture, VisionTower, hf_config
from gemma3_qat.embedded.sentencepiece import train_sentencepiece
from gemma3_qat.tokenizer import CONTROL_TOKENS


def tiny_architecture(vocab_size: int, *, hidden: int = 64, ffn: int = 128, layers: int = 6, heads: int = 2,
                      kv_heads: int = 1, head_dim: int = 32, sliding_window: int = 8, context: int = 512,
                      vision: VisionTower | None = None) -> Architecture:
    """The tiny models' record: no RoPE scaling, ``query_pre_attn_scalar = head_dim``, the default pattern."""
    return Architecture("tiny", layers, hidden, ffn, heads, kv_heads, head_dim, sliding_window, context, vocab_size,
                        vision=vision, source="tests/builders.py", query_pre_attn_scalar=head_dim)


# A 4B-style tower, small: 56 px, patch 14 (16 patches), 4 soft tokens per image; ffn 86 like SigLIP's 4304, not a
# multiple of 32.
TINY_SIGLIP = VisionTower(image_size=56, patch_size=14, layers=2, hidden=32, ffn=86, heads=2, tokens_per_image=4)


def tiny_text_config(vocab_size: int, **shape):
    """A ``Gemma3TextConfig`` of ``tiny_architecture(vocab_size, **shape)``."""
    return hf_config(tiny_architecture(vocab_size, **shape))


def tiny_multimodal_config(vocab_size: int, image_token_index: int, boi: int, eoi: int, **text_kwargs):
    """A 4B-style ``Gemma3ForConditionalGeneration`` config with a small SigLIP tower (``TINY_SIGLIP``)."""
    return hf_config(tiny_architecture(vocab_size, vision=TINY_SIGLIP, **text_kwargs),
                     image_token_index=image_token_index, boi_token_index=boi, eoi_token_index=eoi)


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


def shared_gemma3_tokenizer() -> Path | None:
    """Google's real Gemma 3 tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, 262,144 pieces, no
    ``tokenizer.model``), kept next to the repository at ``../shared/gemma3-tokenizer``; None when absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "gemma3-tokenizer"
    return path if (path / "tokenizer.json").exists() else None


def build_random_gemma3(out_dir: str | Path, arch: Architecture, tokenizer_dir: str | Path | None = None, *,
                        seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a randomly initialised Gemma 3 of shape ``arch`` as the hub releases ship it: ``dtype`` (bf16)
    safetensors, ``config.json`` and the tokenizer's ``tokenizer.json`` / ``tokenizer_config.json`` and no
    ``tokenizer.model`` (what transformers 5's ``save_pretrained`` writes and many fine-tunes ship).

    ``tokenizer_dir`` defaults to ``shared_gemma3_tokenizer()``. ``arch.vocab`` is the embedding's row count
    (262,144 text-only, 262,208 multimodal: ``<image_soft_token>`` at 262,144 lies past a text-only embedding,
    as in the release); a multimodal ``arch`` (``arch.vision``) takes its image token ids from the tokenizer.
    E.g. ``build_random_gemma3(d, tiny_architecture(262_144, hidden=64, ffn=128, layers=1))`` (a ~35 MB vocab
    fixture) or ``build_random_gemma3(d, GEMMA3_SHAPES["270m"])``.
    """
    import json

    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    src = Path(tokenizer_dir) if tokenizer_dir is not None else shared_gemma3_tokenizer()
    if src is None:
        raise FileNotFoundError("no tokenizer_dir given and ../shared/gemma3-tokenizer is absent")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)  # not the read-only mode of a shared source
    torch.manual_seed(seed)
    if arch.vision:
        added = json.loads((src / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
        ids = {t["content"]: int(i) for i, t in added.items()}
        config = hf_config(arch, image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"],
                           eoi_token_index=ids["<end_of_image>"])
        model = Gemma3ForConditionalGeneration(config)
    else:
        model = Gemma3ForCausalLM(hf_config(arch))
    model.to(dtype).save_pretrained(out)
    return out
