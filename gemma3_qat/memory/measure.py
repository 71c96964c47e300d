"""A written GGUF file against the prediction from its own metadata, tensor by tensor, header and padding apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from gemma3_qat.errors import MissingFileError
from gemma3_qat.formats import FORMATS
from gemma3_qat.layout import FILE_TYPES, PLAIN_TYPES
from gemma3_qat.memory.base import MemoryInputError, qat_formats
from gemma3_qat.memory.spec import ModelSpec, NotGemma3Error, VisionSpec, _vision_tensors, layer_types
from gemma3_qat.memory.weights import StoredTensor, WeightOptions, _gguf_stored, stored_tensors


@dataclass
class TensorComparison:
    name: str
    predicted_type: str | None
    predicted_bytes: int
    actual_type: str | None
    actual_bytes: int
    note: str = ""

    @property
    def matches(self) -> bool:
        return self.predicted_type == self.actual_type and self.predicted_bytes == self.actual_bytes


@dataclass
class GGUFMeasurement:
    path: str
    architecture: str
    format: str
    embedding: str
    file_bytes: int
    header_bytes: int  # magic, version, counts
    metadata_bytes: int  # key-value pairs (tokenizer included)
    tensor_info_bytes: int  # names, shapes, types, offsets
    alignment_padding: int  # before the data section and between tensors
    predicted_tensor_bytes: int
    actual_tensor_bytes: int
    tensors: list[TensorComparison]

    @property
    def mismatches(self) -> list[TensorComparison]:
        return [t for t in self.tensors if not t.matches]

    @property
    def exact(self) -> bool:
        return not self.mismatches and self.predicted_tensor_bytes == self.actual_tensor_bytes


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


# general.file_type -> type; a mixture's own file type (llama-quantize's Q4_K_M files: q4_k_m)
_FILE_TYPE_FORMATS = {int(FILE_TYPES[t]): name for name, t in PLAIN_TYPES.items()} | {
    int(f.gguf_file_type): name for name, f in FORMATS.items() if f.gguf_file_type is not None}


def _spec_from_gguf(reader, path: Path) -> tuple[ModelSpec | VisionSpec, int, str]:
    """The architecture from the file's own metadata (what llama.cpp reads): (the text model's record, or the
    mmproj file's vision tower; the text model's width; the architecture name)."""
    arch = _field(reader, "general.architecture")
    if arch == "gemma3":
        p = "gemma3."
        layers = _field(reader, p + "block_count")
        spec = ModelSpec(path.stem, layers, _field(reader, p + "embedding_length"),
                         _field(reader, p + "feed_forward_length"), _field(reader, p + "attention.head_count"),
                         _field(reader, p + "attention.head_count_kv"), _field(reader, p + "attention.key_length"),
                         _field(reader, p + "attention.sliding_window"), _field(reader, p + "context_length"),
                         len(reader.fields["tokenizer.ggml.tokens"].data), tuple(layer_types(layers)),
                         source=str(path))
        return spec, spec.hidden, arch
    if arch == "clip":
        p = "clip.vision."
        vision = VisionSpec(_field(reader, p + "image_size"), _field(reader, p + "patch_size"),
                            _field(reader, p + "block_count"), _field(reader, p + "embedding_length"),
                            _field(reader, p + "feed_forward_length"))
        return vision, _field(reader, p + "projection_dim"), arch
    raise NotGemma3Error(f"{path} is a {arch!r} GGUF, not a Gemma 3 model or its mmproj file")


def _file_format(reader, requested: str | None) -> tuple[str, bool]:
    """(format, embedding trained quantized) as recorded by our exporter, else from general.file_type."""
    if requested:
        return requested, False
    recorded = _field(reader, "gemma3_qat.format")
    if recorded in qat_formats():
        return recorded, bool(_field(reader, "gemma3_qat.quantize_embeddings", False))
    file_type = _field(reader, "general.file_type", 1)
    if file_type not in _FILE_TYPE_FORMATS:
        raise MemoryInputError(f"cannot tell the format of this file (general.file_type {file_type}); pass --format")
    return _FILE_TYPE_FORMATS[file_type], False


def _layout_bytes(reader, file_bytes: int, tensor_bytes: int) -> tuple[int, int, int, int]:
    """(header, metadata, tensor infos, alignment padding) of a GGUF file."""
    infos = [t.field for t in reader.tensors]
    info_start = min((f.offset for f in infos), default=reader.data_offset)
    info_end = max((f.offset + sum(p.nbytes for p in f.parts) for f in infos), default=info_start)
    header = min((f.offset for k, f in reader.fields.items() if not k.startswith("GGUF.")), default=info_start)
    return header, info_start - header, info_end - info_start, file_bytes - info_end - tensor_bytes


def measure_gguf(path: str | Path, *, format: str | None = None, embedding: str = "auto") -> GGUFMeasurement:
    """Compare a GGUF file with the prediction from its own architecture metadata, tensor by tensor.

    The format comes from our exporter's ``gemma3_qat.format`` key (and ``quantize_embeddings``), else from
    ``general.file_type``; ``format``/``embedding`` override. An mmproj file is predicted as the mmproj exporter
    writes it.
    """
    from gemma3_qat.gguf_file import open_gguf

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    reader = open_gguf(path)  # validated first: a torn or corrupt file is one line naming it
    spec, text_hidden, arch = _spec_from_gguf(reader, path)
    fmt, emb_quantized = _file_format(reader, format)
    if emb_quantized and embedding == "auto":
        embedding = "quantized"
    opts = WeightOptions(fmt, "gguf", embedding, "auto")
    if arch == "clip":
        predicted = [_gguf_stored(t, opts) for t in _vision_tensors(spec, text_hidden)]
    else:
        predicted = stored_tensors(replace(spec, vision=None), opts)
    actual = {t.name: t for t in reader.tensors}
    rows = []
    for p in predicted:
        a = actual.pop(p.name, None)
        row = TensorComparison(p.name, p.type, p.nbytes, a.tensor_type.name if a is not None else None,
                               int(a.n_bytes) if a is not None else 0)
        if a is None:
            row.note = "missing from the file"
        elif not row.matches:
            row.note = _mismatch_reason(p, row, fmt)
        rows.append(row)
    for name, a in actual.items():
        rows.append(TensorComparison(name, None, 0, a.tensor_type.name, int(a.n_bytes), "not predicted"))
    file_bytes = path.stat().st_size
    actual_total = sum(int(t.n_bytes) for t in reader.tensors)
    header, metadata, infos, padding = _layout_bytes(reader, file_bytes, actual_total)
    return GGUFMeasurement(str(path), arch, fmt, embedding, file_bytes, header, metadata, infos, padding,
                           sum(p.nbytes for p in predicted), actual_total, rows)


def _mismatch_reason(p: StoredTensor, row: TensorComparison, fmt: str) -> str:
    if fmt == "sfp8" and p.type == "BF16" and row.actual_type == "F32":
        return "sfp8 tensor scale is not bf16-exact: the exporter keeps its exact values in F32"
    if fmt == "sfp8" and row.actual_type == "Q8_0":
        return "exported with --lossy (Q8_0)"
    if p.group == "embedding":
        return "embedding type differs: exported with another --embedding-type? pass --embedding"
    return "type differs"
