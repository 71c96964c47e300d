"""What a model is, as far as memory is concerned: a built-in size, an HF config or a directory; its counts.

The record itself is ``gemma3_qat.models.Architecture`` (``ModelSpec`` here), with its tensors by group; this
module resolves a name or directory to one and counts its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gemma3_qat.errors import MissingFileError
from gemma3_qat.memory.base import GROUPS, MemoryInputError
from gemma3_qat.models import (
    FULL,
    GEMMA3_SHAPES,
    SLIDING,
    Architecture,
    NotGemma3Error,
    TensorSpec,
    architecture_from_hf_config,
    read_architecture,
    hf_config,
    layer_types,
    model_tensors,
    text_tensors,
    vision_tensors,
)
from gemma3_qat.models import VisionTower as VisionSpec

ModelSpec = Architecture  # the memory module's name for the one architecture record
spec_from_hf_config = architecture_from_hf_config
_text_tensors, _vision_tensors = text_tensors, vision_tensors
__all__ = ["FULL", "SLIDING", "ModelSpec", "VisionSpec", "TensorSpec", "NotGemma3Error", "hf_config", "layer_types",
           "model_tensors", "spec_from_hf_config", "spec_from_shape", "spec_from_directory", "model_spec",
           "ParamCounts", "param_counts"]


def spec_from_shape(shape: Architecture) -> ModelSpec:
    """A released size is already its record (kept for callers of the two-record era)."""
    return shape


def spec_from_directory(path: str | Path) -> ModelSpec:
    """A checkpoint directory (or its config.json): any Gemma 3 config, text-only or multimodal."""
    path = Path(path).expanduser()
    config_path = path if path.is_file() else path / "config.json"
    if not config_path.exists():
        raise MissingFileError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    return read_architecture(config_path)


def model_spec(model: str | ModelSpec) -> ModelSpec:
    """``270m``/``1b``/``4b``/``12b``/``27b`` (built-in shapes) or a directory holding a Gemma 3 config.json."""
    if isinstance(model, ModelSpec):
        return model
    key = str(model).lower()
    if key in GEMMA3_SHAPES:
        return GEMMA3_SHAPES[key]
    if Path(model).expanduser().exists():
        return spec_from_directory(model)
    raise MemoryInputError(f"unknown model {model!r}; known: {', '.join(GEMMA3_SHAPES)}, or a directory with a "
                           "Gemma 3 config.json")


@dataclass
class ParamCounts:
    """Parameters by group. ``non_embedding`` and ``vision`` are Table 1's columns of the Gemma 3 report."""

    model: str
    embedding: int
    attention: int
    mlp: int
    norms: int
    vision: int
    projector: int

    @property
    def non_embedding(self) -> int:
        return self.attention + self.mlp + self.norms

    @property
    def text(self) -> int:
        return self.embedding + self.non_embedding

    @property
    def total(self) -> int:
        return self.text + self.vision + self.projector

    @property
    def matmul(self) -> int:
        return self.attention + self.mlp


def param_counts(model: str | ModelSpec) -> ParamCounts:
    spec = model_spec(model)
    sums = dict.fromkeys(GROUPS, 0)
    for t in model_tensors(spec):
        sums[t.group] += t.numel
    return ParamCounts(spec.name, **sums)


# ============================================================================================= weight bytes
