"""Checkpoint directories: reading any Gemma 3 HF checkpoint lazily, and the QAT checkpoint layout.

A QAT checkpoint is a plain HF checkpoint of the student's LATENT (unquantized) weights in the master-weight dtype
(``config.json``, ``model.safetensors`` or shards + index, tokenizer files incl. ``tokenizer.model``) plus
``qat.json``: the format, whether the embedding is quantized, the teacher, the data, the steps and the metrics.
The exporters apply the format's numerics to the latent weights, which reproduces the final training forward's
codes exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemma3_qat.formats import get_format
from gemma3_qat.models import NotGemma3Error

QAT_JSON = "qat.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "preprocessor_config.json",
                   "processor_config.json")


@dataclass
class QATMetadata:
    """The contents of ``qat.json``."""

    format: str
    quantize_embeddings: bool = False
    quantized_modules: list[str] = field(default_factory=list)
    teacher: str | None = None
    data: list[str] = field(default_factory=list)
    steps: int = 0
    kd: str | None = None
    metrics: dict = field(default_factory=dict)
    gemma3_qat_version: str = ""

    def __post_init__(self):
        get_format(self.format)  # an unknown format is a clear error, naming the valid ones

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> "QATMetadata":
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Checkpoint:
    """A local Gemma 3 checkpoint directory, read lazily (tensor by tensor, row chunks) from its safetensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        config_path = self.path / "config.json"
        if not config_path.exists():
            raise NotGemma3Error(f"{self.path} has no config.json: not a Hugging Face checkpoint directory")
        self.config = json.loads(config_path.read_text())
        model_type = self.config.get("model_type")
        if model_type not in ("gemma3", "gemma3_text"):
            raise NotGemma3Error(f"{self.path} is not a Gemma 3 checkpoint (model_type {model_type!r})")
        self.multimodal = model_type == "gemma3"
        self.text_config = self.config.get("text_config", {}) if self.multimodal else self.config
        self.qat = QATMetadata.read(self.path / QAT_JSON) if (self.path / QAT_JSON).exists() else None
        self._files = self._weight_files()
        self._handles: dict[Path, object] = {}

    def _weight_files(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"{self.path} has no model.safetensors (or index): no weights to read")
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}

    def _handle(self, file: Path):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(file, "pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._files[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(self._files[name]).get_slice(name).get_dtype()

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        handle = self._handle(self._files[name])
        if rows is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[rows]

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._files.values()))

    def require_tokenizer_model(self) -> Path:
        path = self.path / "tokenizer.model"
        if not path.exists():
            raise FileNotFoundError(
                f"{self.path} has no tokenizer.model: copy the SentencePiece model of the base checkpoint next to "
                "config.json (transformers' save_pretrained does not write it)"
            )
        return path


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


@contextmanager
def atomic_directory(final: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final`` in one rename.

    On error the temporary directory is removed and ``final`` is untouched. Refuses an existing ``final`` unless
    ``force``; the old directory is only removed after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not force:
        raise FileExistsError(f"{final} already exists; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


@contextmanager
def atomic_file(final: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it replaces ``final`` atomically (``os.replace``)."""
    final = Path(final)
    if final.exists() and not force:
        raise FileExistsError(f"{final} already exists; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


def save_qat_checkpoint(model, out_dir: str | Path, metadata: QATMetadata, tokenizer_src: str | Path,
                        *, force: bool = False) -> Path:
    """Write a QAT checkpoint directory atomically: latent weights (as held), config, tokenizer, ``qat.json``."""
    from gemma3_qat.qat.prepare import qat_config_of

    with atomic_directory(out_dir, force=force) as tmp:
        # save_pretrained writes the Parameters as they are: the fake-quant modules keep the plain state-dict keys
        model.save_pretrained(tmp)
        copy_tokenizer_files(tokenizer_src, tmp)
        config = qat_config_of(model)
        if config is not None and config.format != metadata.format:
            raise ValueError(f"model is prepared for {config.format} but metadata says {metadata.format}")
        (tmp / QAT_JSON).write_text(metadata.to_json())
    return Path(out_dir)
