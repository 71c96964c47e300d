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
from gemma3_qat.errors import InputError, MissingFileError, OutputExistsError

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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts (8-byte length, header, data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


class Checkpoint:
    """A local Gemma 3 checkpoint directory, read lazily (tensor by tensor, row chunks) from its safetensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingFileError(f"checkpoint directory {self.path} does not exist")
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

    def _weight_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: self.path / file for name, file in weight_map.items()}
        else:
            single = self.path / "model.safetensors"
            if not single.exists():
                raise MissingFileError(f"{self.path} has no model.safetensors (or index): no weights to read")
            files = {name: single for name in _safetensors_header(single)[0] if name != "__metadata__"}
        self._headers = {f: _safetensors_header(f) for f in set(files.values())}
        return files

    def _entry(self, name: str) -> tuple[dict, int, Path]:
        file = self._files[name]
        header, data_start = self._headers[file]
        return header[name], data_start, file

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[0]["shape"])

    def dtype(self, name: str) -> str:
        return self._entry(name)[0]["dtype"]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A tensor, or a slice of its rows, read with plain file reads: nothing of the file stays mapped in this
        process (a memory map would keep every page read resident: 4 GB of RSS for a 1B fp32 checkpoint)."""
        entry, data_start, file = self._entry(name)
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        if rows is not None:
            first, last, _ = rows.indices(shape[0])
            begin, shape = begin + first * row_bytes, [last - first, *shape[1:]]
            end = begin + (last - first) * row_bytes
        out = torch.empty(shape, dtype=dtype)
        with open(file, "rb") as f:
            f.seek(data_start + begin)
            f.readinto(memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else bytearray())
        return out

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._files.values()))

    def require_tokenizer_model(self) -> Path:
        path = self.path / "tokenizer.model"
        if not path.exists():
            raise MissingFileError(
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
        raise OutputExistsError(f"{final} already exists; pass --force to replace it")
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
        raise OutputExistsError(f"{final} already exists; pass --force to replace it")
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
            raise InputError(f"model is prepared for {config.format} but metadata says {metadata.format}")
        (tmp / QAT_JSON).write_text(metadata.to_json())
    return Path(out_dir)
