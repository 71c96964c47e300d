"""The embedded default: a small, genuinely trained Gemma 3 and its data, shipped in the package."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEFAULT_MODEL = ASSETS / "default-model"


def default_model_path() -> Path:
    """The embedded default model's checkpoint directory (config, bf16 safetensors, tokenizer incl. tokenizer.model)."""
    if not (DEFAULT_MODEL / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded default model is missing at {DEFAULT_MODEL}; rebuild it with "
            "`gemma3-qat pretrain-default` or pass --model"
        )
    return DEFAULT_MODEL


SAMPLE_MIXTURE = {"sample-text.jsonl": 0.8, "sample-chat.jsonl": 0.2}  # mostly text, like the pretraining data


def sample_data_files() -> list[Path]:
    """The bundled sample datasets: plain text and chat ``messages`` JSONL (from the training split)."""
    return [DEFAULT_MODEL / "data" / name for name in SAMPLE_MIXTURE]


def sample_data_specs() -> list[str]:
    """The bundled sample data as ``--data FILE:WEIGHT`` specs: the default mixture of ``train``."""
    return [f"{DEFAULT_MODEL / 'data' / name}:{weight}" for name, weight in SAMPLE_MIXTURE.items()]


def validation_documents() -> list[dict]:
    """The shipped validation split of the standard-library corpus: ``{"path", "text"}`` per module file."""
    import gzip
    import json

    with gzip.open(DEFAULT_MODEL / "data" / "validation.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
