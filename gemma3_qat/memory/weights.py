"""Weight bytes: how each tensor of a model is stored in a container (gguf, compact), and the totals by group.

The per-tensor type rules (``_gguf_stored``, ``_compact_stored``) ask the exporters' own policy
(``layout``) and the format objects, so they say what the exporters write; ``weight_bytes`` adds them
up by group. Byte arithmetic is ggml's row size over the ``gguf`` package's ``GGML_QUANT_SIZES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma3_qat.layout import PLAIN_TYPES, GGUFTypes, role_is_quantized, text_gguf_name, vision_gguf_name
from gemma3_qat.formats import FORMATS, FormatError, WeightFormat
from gemma3_qat.mixtures import mixture_lattices
from gemma3_qat.memory.base import (
    CONTAINERS,
    EMBEDDING_CHOICES,
    GROUPS,
    qat_formats,
    VISION_CHOICES,
    weight_formats,
    MemoryInputError,
    _type_bytes,
)
from gemma3_qat.memory.spec import ModelSpec, TensorSpec, model_spec, model_tensors


@dataclass(frozen=True)
class WeightOptions:
    """How each group is stored. Validated on creation.

    ``format``     bf16 (the unquantized checkpoint), a QAT format, or a plain GGUF type (f32, f16, q8_0, q4_0).
    ``container``  ``gguf``: exactly what ``export_gguf`` writes (int4-channel as Q4_0 = 4.5 bits, sfp8 as its
                   exact BF16 values, norms F32; multimodal: the mmproj file, F16 matrices and F32 vectors).
                   ``compact``: the format's own home (compressed-tensors, gemma.cpp): int4-channel 4 bits + one
                   fp16 scale per row, int4-block 4 bits + one fp16 scale per 32, sfp8 1 byte + one fp32 scale per
                   tensor; everything unquantized in bf16.
    ``embedding``  ``auto``: GGUF = the exporter's ``--embedding-type auto`` (Q8_0, or the plain type when that
                   is f32/f16/bf16); compact = bf16 (gemma.cpp and compressed-tensors keep it unquantized).
                   ``quantized``: trained on the format's grid (``--quantize-embeddings``). Or a type name.
                   A mixture (q4_k_m) always trains it, at its policy's type: ``auto`` = ``quantized``.
    ``vision``     ``auto`` (GGUF: as the mmproj exporter; compact: bf16), ``none`` (text only), or a type.
    ``lossy``      sfp8 in GGUF as Q8_0 (the exporter's ``--lossy``).
    """

    format: str = "bf16"
    container: str = "gguf"
    embedding: str = "auto"
    vision: str = "auto"
    lossy: bool = False

    def __post_init__(self):
        if self.format not in weight_formats():
            raise MemoryInputError(f"unknown format {self.format!r}; choose one of: {', '.join(weight_formats())}")
        if self.container not in CONTAINERS:
            raise MemoryInputError(f"unknown container {self.container!r}; choose one of: {', '.join(CONTAINERS)}")
        if self.embedding not in EMBEDDING_CHOICES:
            raise MemoryInputError(f"unknown embedding type {self.embedding!r}; choose one of: "
                                   f"{', '.join(EMBEDDING_CHOICES)}")
        if self.vision not in VISION_CHOICES:
            raise MemoryInputError(f"unknown vision type {self.vision!r}; choose one of: {', '.join(VISION_CHOICES)}")
        if self.embedding == "quantized" and self.format not in qat_formats():
            raise MemoryInputError(f"--embedding quantized needs a QAT format ({', '.join(qat_formats())}), not "
                                   f"{self.format}")
        if self.format in FORMATS and FORMATS[self.format].is_mixture:
            if self.embedding not in ("auto", "quantized"):
                raise MemoryInputError(f"{self.format}'s embedding takes its policy's type (Q6_K, or Q8_0 when "
                                       f"rows are not a multiple of 256); drop --embedding {self.embedding}")
            object.__setattr__(self, "embedding", "quantized")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as stored: ``type`` is a GGML type name (gguf) or a compact encoding label."""

    name: str  # GGUF name in the gguf container, HF name otherwise
    hf_name: str
    shape: tuple[int, ...]
    group: str
    type: str
    nbytes: int


def _lattices(spec: ModelSpec, opts: WeightOptions) -> dict[str, WeightFormat] | None:
    """HF name -> lattice of a mixture's tensors (``mixtures.mixture_lattices``: what the trainer and the
    exporter use); None for a single format."""
    fmt = FORMATS.get(opts.format)
    if fmt is None or not fmt.is_mixture:
        return None
    return {name: FORMATS[lattice] for name, lattice in mixture_lattices(spec, fmt.name).items()}


def _gguf_types(opts: WeightOptions, lattices: dict[str, WeightFormat] | None = None) -> GGUFTypes:
    """The exporter's own type policy (``exporters.layout.GGUFTypes``) for these options: one rule for both."""
    fmt = FORMATS.get(opts.format)  # a QAT format, or None for bf16 / a plain GGUF type
    return GGUFTypes(fmt, None if fmt else opts.format, quantize_embeddings=opts.embedding == "quantized",
                     embedding_type="auto" if opts.embedding in ("auto", "quantized") else opts.embedding,
                     vision_type="f16" if opts.vision in ("auto", "none") else opts.vision,
                     lossy=opts.lossy and fmt is not None and fmt.gguf_lossy is not None, lattices=lattices)


def _gguf_stored(t: TensorSpec, opts: WeightOptions, lattices: dict[str, WeightFormat] | None = None) -> StoredTensor:
    """As ``export_gguf`` writes it. A per-tensor-scale format (sfp8) is predicted at its usual scale (BF16);
    only the file can tell a tensor whose scale is not bf16-exact (F32): ``measure_gguf`` explains it.
    ``lattices``: a mixture's (``_lattices``)."""
    vision = t.group in ("vision", "projector")
    name = vision_gguf_name(t.name) if vision else text_gguf_name(t.name)
    types = _gguf_types(opts, lattices)
    trained = types.format_of(t.group, t.name)
    if trained is not None:
        try:
            trained.check_shape(t.shape)  # its own words: q4_k on 640-wide rows names q4_k_m
        except FormatError as e:
            raise MemoryInputError(f"{t.name}: {e}") from None
    ggml_type = types.ggml_type(t.group, name, t.shape, hf_name=t.name)
    return StoredTensor(name, t.name, t.shape, t.group, ggml_type.name, _type_bytes(ggml_type, t.numel, t.shape[-1]))


def _compact_stored(t: TensorSpec, opts: WeightOptions, lattices: dict[str, WeightFormat] | None = None
                    ) -> StoredTensor:
    """In the format's own container: its trained tensors at the format's ``compact_bytes`` (a mixture's: each
    tensor's lattice's), the rest bf16 (the checkpoint's dtype) unless a type is asked for."""
    if lattices is not None:
        if t.name in lattices:
            fmt = lattices[t.name]
            return StoredTensor(t.name, t.name, t.shape, t.group, fmt.compact_label, fmt.compact_bytes(t.shape))
    elif role_is_quantized(t.group, opts.embedding == "quantized") and opts.format in FORMATS:
        fmt = FORMATS[opts.format]
        return StoredTensor(t.name, t.name, t.shape, t.group, fmt.compact_label, fmt.compact_bytes(t.shape))
    if t.group in ("vision", "projector"):
        label = "bf16" if opts.vision == "auto" else opts.vision
    elif t.group == "embedding":
        label = "bf16" if opts.embedding == "auto" else opts.embedding
    elif t.group == "norms":
        label = "bf16"  # the checkpoint's dtype; a few hundred KB whatever the choice
    else:
        label = opts.format if opts.format in PLAIN_TYPES else "bf16"  # bf16, a plain type; a mixture's F16 rest
    ggml_type = PLAIN_TYPES[label]
    return StoredTensor(t.name, t.name, t.shape, t.group, ggml_type.name,
                        _type_bytes(ggml_type, t.numel, t.shape[-1]))


def stored_tensors(model: str | ModelSpec, opts: WeightOptions) -> list[StoredTensor]:
    """Every tensor with its storage type and exact bytes (no ``vision`` group when ``opts.vision == 'none'``)."""
    spec = model_spec(model)
    lattices = _lattices(spec, opts)
    out = []
    for t in model_tensors(spec):
        if t.group in ("vision", "projector") and opts.vision == "none":
            continue
        stored = _gguf_stored if opts.container == "gguf" else _compact_stored
        out.append(stored(t, opts, lattices))
    return out


@dataclass
class WeightBytes:
    """Bytes of one (model, format, container): by group, and the types used."""

    model: str
    format: str
    container: str
    embedding: str
    vision: str
    by_group: dict[str, int]
    types: dict[str, str]  # group -> storage types used in it
    note: str = ""

    @property
    def total(self) -> int:
        return sum(self.by_group.values())

    @property
    def text(self) -> int:
        return sum(v for k, v in self.by_group.items() if k not in ("vision", "projector"))


_NOTES = {
    ("int4-channel", "gguf"): "GGUF has no per-channel type: Q4_0 with the row scale in every block (4.5 bits)",
    ("int4-channel", "compact"): "4 bits + one fp16 scale per row (compressed-tensors W4A16 channel)",
    ("int4-block", "gguf"): "Q4_0: 18 bytes per 32 weights",
    ("int4-block", "compact"): "4 bits + one fp16 scale per 32 (compressed-tensors W4A16 group 32 = Q4_0 bytes)",
    ("sfp8", "gguf"): "no SFP type in GGUF: exact BF16 values (F32 if a tensor scale is not bf16-exact)",
    ("sfp8", "compact"): "1 byte + one fp32 scale per tensor (gemma.cpp SFP)",
    ("q4_k_m", "gguf"): "llama-quantize Q4_K_M's type per tensor (Q4_K, Q6_K; Q5_0 / Q8_0 where rows are not a "
                        "multiple of 256)",
    ("q4_k_m", "compact"): "as gguf (ggml's block layout is the lattices' own container), the rest bf16",
}


def embedding_for(fmt: str, embedding: str) -> str:
    """``quantized`` only means something for a QAT format: the others fall back to ``auto``."""
    return "auto" if embedding == "quantized" and fmt not in qat_formats() else embedding


def weight_bytes(model: str | ModelSpec, opts: WeightOptions | None = None, **kwargs) -> WeightBytes:
    """Bytes by group of ``model`` stored as ``opts`` (or ``WeightOptions(**kwargs)``)."""
    opts = opts or WeightOptions(**kwargs)
    spec = model_spec(model)
    by_group = dict.fromkeys(GROUPS, 0)
    types: dict[str, set[str]] = {g: set() for g in GROUPS}
    for st in stored_tensors(spec, opts):
        by_group[st.group] += st.nbytes
        types[st.group].add(st.type)
    return WeightBytes(spec.name, opts.format, opts.container, opts.embedding, opts.vision, by_group,
                       {g: "/".join(sorted(v)) for g, v in types.items() if v},
                       _NOTES.get((opts.format, opts.container), ""))
