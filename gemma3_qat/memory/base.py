"""What every memory view shares: its unit, its error, its choice lists and ggml's row-size rule."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemma3_qat.errors import InputError
from gemma3_qat.formats import FORMATS
from gemma3_qat.layout import PLAIN_TYPES
from gemma3_qat.models import ROLES

T = GGMLQuantizationType
GB = 1e9  # Table 3's unit: decimal gigabytes
GROUPS = ROLES  # the architecture's tensor groups: what every view counts by
CONTAINERS = ("gguf", "compact")
TABLE_FORMATS = ("bf16", "int4-channel", "int4-block", "sfp8")  # Table 3's columns, in its order


def qat_formats() -> tuple[str, ...]:
    """The registered QAT formats (``formats.FORMATS``, read at each call: a format registered later counts)."""
    return tuple(FORMATS)


def weight_formats() -> tuple[str, ...]:
    """Every ``--format`` the memory model prices: Table 3's, the QAT formats and the plain GGUF types."""
    return tuple(dict.fromkeys(TABLE_FORMATS + qat_formats() + tuple(PLAIN_TYPES)))


EMBEDDING_CHOICES = ("auto", "quantized", *PLAIN_TYPES)
VISION_CHOICES = ("auto", "none", "f32", "f16", "bf16")
KV_DTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}


class MemoryInputError(InputError):
    """A bad request (unknown model, non-positive number, missing optional dependency): one line, says the fix."""


def _positive(name: str, value: int | float) -> None:
    if value is None or value <= 0:
        raise MemoryInputError(f"--{name} must be a positive number, got {value}")


def _type_bytes(ggml_type: GGMLQuantizationType, n_elements: int, row: int) -> int:
    """Bytes of ``n_elements`` stored as ``ggml_type`` in rows of ``row`` elements (ggml's ``ggml_row_size``)."""
    block, size = GGML_QUANT_SIZES[ggml_type]
    if row % block:
        raise MemoryInputError(f"{ggml_type.name} needs rows that are a multiple of {block}, got {row}")
    return n_elements // block * size
