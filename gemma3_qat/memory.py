"""How much memory a Gemma 3 model takes: parameters, weight bytes per format, KV cache, training, Table 3.

Everything is computed from shapes, with the same byte arithmetic as our exporters: GGUF type sizes come from the
``gguf`` package's ``GGML_QUANT_SIZES`` (the table that mirrors ggml's C code), model shapes from
``gemma3_qat.models`` and tensor names from the GGUF exporter's own name mapping, so that a prediction can be
checked against a written file tensor by tensor (``measure_gguf``). Units: GB = 1e9 bytes (Table 3 of the Gemma 3
report uses decimal GB; GiB fits none of its columns).

Views (each a function returning dataclasses; ``gemma3-qat memory`` prints them):

* ``param_counts``   parameters by group (embedding, attention, MLP, norms, vision, projector)
* ``weight_bytes``   bytes by group for a format in a container: ``gguf`` (llama.cpp, what our exporter writes) or
                     ``compact`` (compressed-tensors / gemma.cpp / safetensors: int4 at 4 bits + scales, SFP8 at
                     1 byte + one scale per tensor)
* ``kv_cache``       KV cache per layer type at any context, batch and KV dtype; plus llama.cpp's exact cell counts
* ``table3``         the report's Table 3: the published cells, our reproduction under one documented convention,
                     and the first-principles value
* ``training_memory`` teacher, student, gradients, AdamW, activations, logits; FSDP per-GPU figures
* ``measure_gguf``   a GGUF file against the prediction, tensor by tensor, header and padding apart
* ``make_baseline`` / ``check_baseline``  the first-principles numbers tracked in CI
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemma3_qat.exporters.gguf import FILE_TYPES, PLAIN_TYPES, text_gguf_name, vision_gguf_name
from gemma3_qat.formats import FORMATS
from gemma3_qat.models import (
    ATTENTION_PROJECTIONS,
    GEMMA3_SHAPES,
    MLP_PROJECTIONS,
    SIGLIP,
    Gemma3Shape,
    NotGemma3Error,
    layer_types,
)
from gemma3_qat.errors import InputError, MissingFileError

T = GGMLQuantizationType
GB = 1e9  # Table 3's unit: decimal gigabytes
GROUPS = ("embedding", "attention", "mlp", "norms", "vision", "projector")
CONTAINERS = ("gguf", "compact")
QAT_FORMATS = tuple(FORMATS)  # int4-block, int4-channel, sfp8
TABLE_FORMATS = ("bf16", "int4-channel", "int4-block", "sfp8")  # Table 3's columns, in its order
WEIGHT_FORMATS = tuple(dict.fromkeys(TABLE_FORMATS + QAT_FORMATS + tuple(PLAIN_TYPES)))  # + f32, f16, q8_0, q4_0
EMBEDDING_CHOICES = ("auto", "quantized", *PLAIN_TYPES)
VISION_CHOICES = ("auto", "none", "f32", "f16", "bf16")
KV_DTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
FULL, SLIDING = "full_attention", "sliding_attention"


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


# ============================================================================================= model description


@dataclass(frozen=True)
class VisionSpec:
    """The SigLIP tower's shape (what the parameter count and the mmproj file need)."""

    image_size: int
    patch_size: int
    layers: int
    hidden: int
    ffn: int
    channels: int = 3

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ModelSpec:
    """A Gemma 3 architecture as far as memory is concerned: built-in size, HF config, or GGUF metadata."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int
    context: int  # max_position_embeddings
    vocab: int  # embedding rows as the checkpoint holds them (HF multimodal configs pad to 262,208)
    layer_types: tuple[str, ...]
    vision: VisionSpec | None = None
    nominal_params: float | None = None  # the "27B" of the name, for Table 3's convention
    source: str = "built-in"

    @property
    def global_layers(self) -> int:
        return sum(t == FULL for t in self.layer_types)

    @property
    def local_layers(self) -> int:
        return self.layers - self.global_layers

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _siglip_spec() -> VisionSpec:
    return VisionSpec(SIGLIP["image_size"], SIGLIP["patch_size"], SIGLIP["layers"], SIGLIP["hidden"], SIGLIP["ffn"])


def spec_from_shape(shape: Gemma3Shape) -> ModelSpec:
    """A released size: the vocabulary as its HF checkpoint holds it (multimodal configs: 262,208 rows)."""
    return ModelSpec(
        shape.name, shape.layers, shape.hidden, shape.ffn, shape.heads, shape.kv_heads, shape.head_dim,
        shape.sliding_window, shape.context, shape.vocab_multimodal if shape.vision else shape.vocab,
        tuple(layer_types(shape.layers)), _siglip_spec() if shape.vision else None, shape.nominal_params,
    )


def hf_config(shape: Gemma3Shape):
    """The transformers config of a released size, as its hub ``config.json`` describes it.

    Text-only (1B) gives a ``Gemma3TextConfig``; 4B+ a ``Gemma3Config`` with the SigLIP tower. Used to check our
    counts against real transformers models (instantiated on the ``meta`` device, no memory).
    """
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    full = {"rope_type": "default", "rope_theta": shape.rope_global}
    if shape.rope_scaling_factor:
        full = {"rope_type": "linear", "factor": shape.rope_scaling_factor, "rope_theta": shape.rope_global}
    text = Gemma3TextConfig(
        vocab_size=shape.vocab_multimodal if shape.vision else shape.vocab,
        hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        sliding_window=shape.sliding_window, max_position_embeddings=shape.context,
        query_pre_attn_scalar=shape.query_pre_attn_scalar, layer_types=layer_types(shape.layers),
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default", "rope_theta": shape.rope_local}},
        rms_norm_eps=shape.rms_norm_eps, tie_word_embeddings=True,
    )
    if not shape.vision:
        return text
    vision = SiglipVisionConfig(
        hidden_size=SIGLIP["hidden"], intermediate_size=SIGLIP["ffn"], num_hidden_layers=SIGLIP["layers"],
        num_attention_heads=SIGLIP["heads"], image_size=SIGLIP["image_size"], patch_size=SIGLIP["patch_size"],
        vision_use_head=False,
    )
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        mm_tokens_per_image=SIGLIP["tokens_per_image"], tie_word_embeddings=True)


def spec_from_hf_config(config, name: str, source: str) -> ModelSpec:
    """From a transformers ``Gemma3Config`` / ``Gemma3TextConfig`` (with the defaults released configs rely on)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ("gemma3", "gemma3_text"):
        raise NotGemma3Error(f"{source} is not a Gemma 3 config (model_type {model_type!r}); expected gemma3 or "
                             "gemma3_text")
    text = config.text_config if model_type == "gemma3" else config
    vision = None
    if model_type == "gemma3":
        v = config.vision_config
        vision = VisionSpec(v.image_size, v.patch_size, v.num_hidden_layers, v.hidden_size, v.intermediate_size,
                            getattr(v, "num_channels", 3))
    types = tuple(getattr(text, "layer_types", None) or layer_types(text.num_hidden_layers))
    return ModelSpec(name, text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                     text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.sliding_window,
                     text.max_position_embeddings, text.vocab_size, types, vision, None, source)


def spec_from_directory(path: str | Path) -> ModelSpec:
    """A checkpoint directory (or its config.json): any Gemma 3 config, text-only or multimodal."""
    path = Path(path).expanduser()
    config_path = path if path.is_file() else path / "config.json"
    if not config_path.exists():
        raise MissingFileError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") not in ("gemma3", "gemma3_text"):
        raise NotGemma3Error(f"{config_path} is not a Gemma 3 config (model_type {raw.get('model_type')!r}); "
                             "expected gemma3 or gemma3_text")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(config_path.parent))
    return spec_from_hf_config(config, config_path.parent.name, str(config_path))


def model_spec(model: str | ModelSpec) -> ModelSpec:
    """``1b``/``4b``/``12b``/``27b`` (built-in shapes) or a directory holding a Gemma 3 config.json."""
    if isinstance(model, ModelSpec):
        return model
    key = str(model).lower()
    if key in GEMMA3_SHAPES:
        return spec_from_shape(GEMMA3_SHAPES[key])
    if Path(model).expanduser().exists():
        return spec_from_directory(model)
    raise MemoryInputError(f"unknown model {model!r}; known: {', '.join(GEMMA3_SHAPES)}, or a directory with a "
                           "Gemma 3 config.json")


# ============================================================================================= tensors and counts


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: its HF name (transformers 5 layout), torch shape ``[out, in]`` and group."""

    name: str
    shape: tuple[int, ...]
    group: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matmul(self) -> bool:
        return self.group in ("attention", "mlp")


def _text_tensors(spec: ModelSpec) -> list[TensorSpec]:
    prefix = "model.language_model." if spec.vision else "model."
    h, q, kv, f, d = spec.hidden, spec.q_dim, spec.kv_dim, spec.ffn, spec.head_dim
    out = [TensorSpec(f"{prefix}embed_tokens.weight", (spec.vocab, h), "embedding")]
    attn = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    mlp = {"gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    for i in range(spec.layers):
        base = f"{prefix}layers.{i}."
        out += [TensorSpec(f"{base}self_attn.{n}.weight", attn[n], "attention") for n in ATTENTION_PROJECTIONS]
        out += [TensorSpec(f"{base}self_attn.{n}.weight", (d,), "norms") for n in ("q_norm", "k_norm")]
        out += [TensorSpec(f"{base}mlp.{n}.weight", mlp[n], "mlp") for n in MLP_PROJECTIONS]
        out += [TensorSpec(f"{base}{n}.weight", (h,), "norms") for n in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    out.append(TensorSpec(f"{prefix}norm.weight", (h,), "norms"))
    return out


def _vision_tensors(v: VisionSpec, text_hidden: int) -> list[TensorSpec]:
    base = "model.vision_tower."
    out = [TensorSpec(f"{base}embeddings.patch_embedding.weight", (v.hidden, v.channels, v.patch_size, v.patch_size),
                      "vision"),
           TensorSpec(f"{base}embeddings.patch_embedding.bias", (v.hidden,), "vision"),
           TensorSpec(f"{base}embeddings.position_embedding.weight", (v.patches, v.hidden), "vision")]
    linears = {"self_attn.q_proj": (v.hidden, v.hidden), "self_attn.k_proj": (v.hidden, v.hidden),
               "self_attn.v_proj": (v.hidden, v.hidden), "self_attn.out_proj": (v.hidden, v.hidden),
               "mlp.fc1": (v.ffn, v.hidden), "mlp.fc2": (v.hidden, v.ffn)}
    for i in range(v.layers):
        layer = f"{base}encoder.layers.{i}."
        for name, shape in linears.items():
            out += [TensorSpec(f"{layer}{name}.weight", shape, "vision"),
                    TensorSpec(f"{layer}{name}.bias", (shape[0],), "vision")]
        for norm in ("layer_norm1", "layer_norm2"):
            out += [TensorSpec(f"{layer}{norm}.{p}", (v.hidden,), "vision") for p in ("weight", "bias")]
    out += [TensorSpec(f"{base}post_layernorm.{p}", (v.hidden,), "vision") for p in ("weight", "bias")]
    projector = "model.multi_modal_projector."
    out += [TensorSpec(f"{projector}mm_input_projection_weight", (v.hidden, text_hidden), "projector"),
            TensorSpec(f"{projector}mm_soft_emb_norm.weight", (v.hidden,), "projector")]
    return out


def model_tensors(spec: ModelSpec) -> list[TensorSpec]:
    """Every stored tensor of the model (the tied head is the embedding: not listed twice)."""
    tensors = _text_tensors(spec)
    if spec.vision:
        tensors += _vision_tensors(spec.vision, spec.hidden)
    return tensors


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
    ``vision``     ``auto`` (GGUF: as the mmproj exporter; compact: bf16), ``none`` (text only), or a type.
    ``lossy``      sfp8 in GGUF as Q8_0 (the exporter's ``--lossy``).
    """

    format: str = "bf16"
    container: str = "gguf"
    embedding: str = "auto"
    vision: str = "auto"
    lossy: bool = False

    def __post_init__(self):
        if self.format not in WEIGHT_FORMATS:
            raise MemoryInputError(f"unknown format {self.format!r}; choose one of: {', '.join(WEIGHT_FORMATS)}")
        if self.container not in CONTAINERS:
            raise MemoryInputError(f"unknown container {self.container!r}; choose one of: {', '.join(CONTAINERS)}")
        if self.embedding not in EMBEDDING_CHOICES:
            raise MemoryInputError(f"unknown embedding type {self.embedding!r}; choose one of: "
                                   f"{', '.join(EMBEDDING_CHOICES)}")
        if self.vision not in VISION_CHOICES:
            raise MemoryInputError(f"unknown vision type {self.vision!r}; choose one of: {', '.join(VISION_CHOICES)}")
        if self.embedding == "quantized" and self.format not in QAT_FORMATS:
            raise MemoryInputError(f"--embedding quantized needs a QAT format ({', '.join(QAT_FORMATS)}), not "
                                   f"{self.format}")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as stored: ``type`` is a GGML type name (gguf) or a compact encoding label."""

    name: str  # GGUF name in the gguf container, HF name otherwise
    hf_name: str
    shape: tuple[int, ...]
    group: str
    type: str
    nbytes: int


def _gguf_matmul_type(opts: WeightOptions) -> GGMLQuantizationType:
    if opts.format in ("int4-block", "int4-channel"):
        return T.Q4_0  # int4-channel: each row's scale repeated in every block (exact, 4.5 bits)
    if opts.format == "sfp8":
        # exact values: BF16 when the tensor's scale has at most 4 significant bits (scale 1 whenever
        # max|w| <= 1.875, the usual case), else F32: only the file can tell, measure_gguf explains it
        return T.Q8_0 if opts.lossy else T.BF16
    return PLAIN_TYPES[opts.format]


def _gguf_embedding_type(opts: WeightOptions) -> GGMLQuantizationType:
    if opts.embedding == "quantized":
        return _gguf_matmul_type(opts)
    if opts.embedding == "auto":  # the exporter's rule (plan_text_export)
        return PLAIN_TYPES[opts.format] if opts.format in ("f32", "f16", "bf16") else T.Q8_0
    return PLAIN_TYPES[opts.embedding]


def _gguf_vision_type(t: TensorSpec, gguf_name: str, opts: WeightOptions) -> GGMLQuantizationType:
    vector_like = len(t.shape) == 1 or gguf_name in ("v.patch_embd.weight", "v.position_embd.weight")
    if vector_like:
        return T.F32  # as plan_mmproj_export
    return T.F16 if opts.vision == "auto" else PLAIN_TYPES[opts.vision]


def _gguf_stored(t: TensorSpec, opts: WeightOptions) -> StoredTensor:
    if t.group in ("vision", "projector"):
        name = vision_gguf_name(t.name)
        ggml_type = _gguf_vision_type(t, name, opts)
    else:
        name = text_gguf_name(t.name)
        if t.group == "norms":
            ggml_type = T.F32
        elif t.group == "embedding":
            ggml_type = _gguf_embedding_type(opts)
        else:
            ggml_type = _gguf_matmul_type(opts)
    return StoredTensor(name, t.name, t.shape, t.group, ggml_type.name, _type_bytes(ggml_type, t.numel, t.shape[-1]))


def _compact_quantized(t: TensorSpec, fmt: str) -> tuple[str, int]:
    """A QAT format in its own container: the codes at the format's bits plus its side information."""
    out, n_in = t.shape[0], math.prod(t.shape[1:])
    if fmt == "int4-channel":
        code_bits = FORMATS[fmt].bits_per_weight  # 4 bits, + one fp16 scale per output row
        return "int4+fp16/row", out * math.ceil(n_in * code_bits / 8) + 2 * out
    if fmt == "int4-block":
        return "int4+fp16/32", _type_bytes(T.Q4_0, t.numel, n_in)  # group-32 int4 = Q4_0's 18 bytes per 32
    code_bits = FORMATS[fmt].bits_per_weight  # sfp8: 1 byte per weight + one fp32 scale per tensor
    return "sfp8+fp32/tensor", math.ceil(t.numel * code_bits / 8) + 4


def _compact_stored(t: TensorSpec, opts: WeightOptions) -> StoredTensor:
    if t.group in ("vision", "projector"):
        label = "bf16" if opts.vision == "auto" else opts.vision
    elif t.group == "norms":
        label = "bf16"  # the checkpoint's dtype; a few hundred KB whatever the choice
    elif t.group == "embedding":
        label = "bf16" if opts.embedding == "auto" else opts.embedding
    else:
        label = opts.format
    if label == "quantized" or label in QAT_FORMATS:
        kind, nbytes = _compact_quantized(t, opts.format)
        return StoredTensor(t.name, t.name, t.shape, t.group, kind, nbytes)
    ggml_type = PLAIN_TYPES[label]
    return StoredTensor(t.name, t.name, t.shape, t.group, ggml_type.name,
                        _type_bytes(ggml_type, t.numel, t.shape[-1]))


def stored_tensors(model: str | ModelSpec, opts: WeightOptions) -> list[StoredTensor]:
    """Every tensor with its storage type and exact bytes (no ``vision`` group when ``opts.vision == 'none'``)."""
    spec = model_spec(model)
    out = []
    for t in model_tensors(spec):
        if t.group in ("vision", "projector") and opts.vision == "none":
            continue
        out.append(_gguf_stored(t, opts) if opts.container == "gguf" else _compact_stored(t, opts))
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
}


def embedding_for(fmt: str, embedding: str) -> str:
    """``quantized`` only means something for a QAT format: the others fall back to ``auto``."""
    return "auto" if embedding == "quantized" and fmt not in QAT_FORMATS else embedding


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


# ============================================================================================= KV cache


@dataclass
class KVCache:
    """KV cache bytes: global layers hold the whole context, local (sliding) layers min(context, window)."""

    model: str
    context: int
    batch: int
    dtype: str
    global_layers: int
    local_layers: int
    window: int
    bytes_per_token_layer: int  # K and V of one token in one layer
    global_bytes: int
    local_bytes: int
    every_layer_global: int  # the same context with no sliding window (llama.cpp swa_full=True)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.global_bytes + self.local_bytes

    @property
    def local_tokens(self) -> int:
        return min(self.context, self.window)


def kv_bytes_per_token_layer(spec: ModelSpec, dtype: str) -> int:
    """K and V of one token in one layer: 2 rows of ``kv_heads * head_dim`` in ``dtype`` (ggml row size)."""
    if dtype not in KV_DTYPES:
        raise MemoryInputError(f"unknown KV dtype {dtype!r}; choose one of: {', '.join(KV_DTYPES)}")
    return 2 * _type_bytes(KV_DTYPES[dtype], spec.kv_dim, spec.kv_dim)


def _context_warnings(spec: ModelSpec, context: int) -> list[str]:
    if context > spec.context:
        return [f"context {context:,} is beyond {spec.name}'s maximum of {spec.context:,} tokens: computed anyway"]
    return []


def kv_cache(model: str | ModelSpec, context: int = 32_768, *, batch: int = 1, dtype: str = "bf16") -> KVCache:
    """The cache a runtime needs at ``context`` tokens for ``batch`` sequences, exactly (no runtime padding: see
    ``LlamaCppKV`` for llama.cpp's cell rounding). A context beyond the model's maximum is computed, with a warning
    in ``KVCache.warnings``."""
    spec = model_spec(model)
    _positive("context", context)
    _positive("batch", batch)
    per = kv_bytes_per_token_layer(spec, dtype)
    local_tokens = min(context, spec.sliding_window)
    return KVCache(spec.name, context, batch, dtype, spec.global_layers, spec.local_layers, spec.sliding_window,
                   per, batch * per * spec.global_layers * context, batch * per * spec.local_layers * local_tokens,
                   batch * per * spec.layers * context, _context_warnings(spec, context))


@dataclass(frozen=True)
class LlamaCppKV:
    """How llama.cpp sizes its two caches (``llama_kv_cache_iswa``, as built in llama-cpp-python 0.3.36).

    ``cell_pad``: n_ctx is rounded up to a multiple of 256 cells, and so is the SWA cache (llama.cpp issue
    #17037, "the SWA cache is always padded to 256 for performance"). ``n_ubatch``: the SWA cache holds the window
    plus one micro-batch (tokens of a micro-batch attend to up to ``window`` earlier positions while being
    written): ``swa_cells = min(ctx_cells, pad(window * n_seq + n_ubatch, 256))``. ``swa_full=True``: local
    layers get the whole context (needed for context shifting/caching of prompts beyond the window).
    """

    n_ubatch: int = 512  # llama.cpp's (and llama-cpp-python's) default micro-batch
    n_seq: int = 1  # sequences sharing one unified cache
    cell_pad: int = 256
    swa_full: bool = False

    def cells(self, spec: ModelSpec, n_ctx: int) -> tuple[int, int]:
        """(cells of the global layers' cache, cells of the local layers' cache)."""
        _positive("context", n_ctx)
        base = -(-n_ctx // self.cell_pad) * self.cell_pad
        if self.swa_full:
            return base, base
        wanted = spec.sliding_window * self.n_seq + self.n_ubatch
        return base, min(base, -(-wanted // self.cell_pad) * self.cell_pad)

    def kv_bytes(self, spec: ModelSpec, n_ctx: int, dtype: str = "f16") -> tuple[int, int]:
        """(bytes of the global layers' cache, bytes of the local layers' cache) as llama.cpp allocates them."""
        base, swa = self.cells(spec, n_ctx)
        per = kv_bytes_per_token_layer(spec, dtype)
        return per * spec.global_layers * base, per * spec.local_layers * swa


# ============================================================================================= Table 3

# Table 3 of the Gemma 3 report (GB): the only hard-coded cells, to compare with. (weights, +KV at 32,768 tokens)
PUBLISHED_TABLE3: dict[str, dict[str, tuple[float, float]]] = {
    "1b": {"bf16": (2.0, 2.9), "int4-channel": (0.5, 1.4), "int4-block": (0.7, 1.6), "sfp8": (1.0, 1.9)},
    "4b": {"bf16": (8.0, 12.7), "int4-channel": (2.6, 7.3), "int4-block": (2.9, 7.6), "sfp8": (4.4, 9.1)},
    "12b": {"bf16": (24.0, 38.9), "int4-channel": (6.6, 21.5), "int4-block": (7.1, 22.0), "sfp8": (12.4, 27.3)},
    "27b": {"bf16": (54.0, 72.7), "int4-channel": (14.1, 32.8), "int4-block": (15.3, 34.0), "sfp8": (27.4, 46.1)},
}
TABLE3_CONTEXT = 32_768


@dataclass(frozen=True)
class PaperConvention:
    """The one convention found to reproduce Table 3 (shared/specs/table3.md); not a derivation.

    N = nominal size (1/4/12/27e9), V = 0.4e9 "400M" vision parameters at bf16 for 4B+ (0 for 1B), GB = 1e9:
    bf16 = 2N; int4 per-channel = 0.5 (N - V) + 2V; SFP8 = 1.0 (N - V) + 2V; int4 blocks=32 =
    0.515625 * non_embedding + 1.125 * (embedding + vision) with exact counts (a curve fit: ~4.1 bits for the
    body, 9 bits for embedding and vision); +KV adds 6 x the true 5:1 bf16 cache at 32,768 tokens (the factor 6
    has no known justification, but the 27B/12B ratio of the increments proves the 5:1 split is in there).
    """

    vision_nominal: float = 0.4e9
    bytes_per_param: tuple[tuple[str, float], ...] = (("bf16", 2.0), ("int4-channel", 0.5), ("sfp8", 1.0))
    block32_body: float = 0.515625
    block32_embedding_vision: float = 1.125
    kv_factor: float = 6.0
    kv_dtype: str = "bf16"

    def weights(self, spec: ModelSpec, column: str) -> float:
        """Bytes of ``column`` for ``spec`` under the convention."""
        if column == "int4-block":
            c = param_counts(spec)
            return self.block32_body * c.non_embedding + self.block32_embedding_vision * (c.embedding + c.vision)
        v = self.vision_nominal if spec.vision else 0.0  # bf16: 2 (N - V) + 2V = 2N
        return dict(self.bytes_per_param)[column] * (spec.nominal_params - v) + 2.0 * v

    def kv(self, spec: ModelSpec, context: int = TABLE3_CONTEXT) -> float:
        return self.kv_factor * kv_cache(spec, context, dtype=self.kv_dtype).total

    def describe(self) -> str:
        per = dict(self.bytes_per_param)
        return (f"GB = 1e9; N = nominal size, V = {self.vision_nominal / 1e9:g}e9 (4B+); bf16 = {per['bf16']:g}N; "
                f"int4/ch = {per['int4-channel']:g}(N-V) + 2V; SFP8 = {per['sfp8']:g}(N-V) + 2V; int4/b32 = "
                f"{self.block32_body:g} non-embedding + {self.block32_embedding_vision:g} (embedding + vision), "
                f"exact counts; +KV = {self.kv_factor:g} x the true 5:1 {self.kv_dtype} cache at "
                f"{TABLE3_CONTEXT:,} tokens")


# Where each Table 3 column lives for the first-principles figure: its natural container.
TABLE3_HOMES = {"bf16": "compact", "int4-channel": "compact", "int4-block": "gguf", "sfp8": "compact"}


@dataclass
class Table3Cell:
    model: str
    column: str
    kv: bool
    published: float  # GB
    paper: float  # GB, the convention, unrounded
    reproduced: bool  # paper rounds to the published 0.1 GB
    residual: float  # paper - published, GB
    first_principles: float  # GB
    difference: float  # first_principles - published, GB
    reason: str


@dataclass
class Table3:
    cells: list[Table3Cell]
    convention: str
    homes: dict[str, str]

    @property
    def reproduced(self) -> int:
        return sum(c.reproduced for c in self.cells)

    @property
    def misses(self) -> list[Table3Cell]:
        return [c for c in self.cells if not c.reproduced]


def _round1(x: float) -> float:
    return math.floor(x * 10 + 0.5) / 10  # half up, as a person rounding to the printed digit


def _fp_reason(spec: ModelSpec, column: str, wb: WeightBytes, counts: ParamCounts, kv: float | None,
               paper_kv: float) -> str:
    """Why the first-principles value differs from the published cell, in a few words."""
    parts = [f"{counts.total / 1e9:.3f}B exact params vs {spec.nominal_params / 1e9:g}B"]
    if column != "bf16":
        parts.append(f"{column} {wb.container}: emb {wb.types['embedding']}"
                     + (f", vision {wb.types['vision']}" if spec.vision else ""))
    if kv is not None:
        parts.append(f"true KV {kv / GB:.3f} vs table's {paper_kv / GB:.3f}")
    return "; ".join(parts)


def table3(*, embedding: str = "auto", convention: PaperConvention | None = None) -> Table3:
    """Each published cell, our reproduction under ``convention`` and the first-principles value.

    First principles: exact counts, each column in its natural container (``TABLE3_HOMES``), the embedding as
    ``embedding`` chooses (``auto``: Q8_0 in GGUF, bf16 in compact containers), the true 5:1 bf16 KV cache.
    """
    convention = convention or PaperConvention()
    cells = []
    for name, row in PUBLISHED_TABLE3.items():
        spec = model_spec(name)
        counts = param_counts(spec)
        true_kv = kv_cache(spec, TABLE3_CONTEXT, dtype=convention.kv_dtype).total
        paper_kv = convention.kv(spec)
        for column, (pub_w, pub_kv) in row.items():
            emb = embedding_for(column, embedding)
            wb = weight_bytes(spec, WeightOptions(column, TABLE3_HOMES[column], emb))
            paper_w = convention.weights(spec, column)
            for kv, pub, paper, fp in ((None, pub_w, paper_w, wb.total), (true_kv, pub_kv, paper_w + paper_kv,
                                                                          wb.total + true_kv)):
                paper, fp = paper / GB, fp / GB
                reproduced = abs(_round1(paper) - pub) < 1e-9
                reason = _fp_reason(spec, column, wb, counts, kv, paper_kv)
                if not reproduced:
                    reason = f"convention gives {paper:.3f}, printed {_round1(paper):.1f}; " + reason
                cells.append(Table3Cell(name, column, kv is not None, pub, paper, reproduced, paper - pub, fp,
                                        fp - pub, reason))
    return Table3(cells, convention.describe(), dict(TABLE3_HOMES))


# ============================================================================================= training


@dataclass(frozen=True)
class TrainingOptions:
    """One QAT-by-distillation setup, as ``gemma3_qat.qat.train`` runs it. Validated on creation.

    ``device``: ``cuda`` (bf16 teacher, bf16 autocast, foreach AdamW) or ``cpu`` (fp32 teacher, fp32 compute).
    ``teacher``: ``live`` (a frozen teacher in memory; train.py keeps it out of FSDP, so every GPU holds all of
    it) or ``cache`` (``--teacher-cache``: sparse targets read from disk, no teacher).
    ``attention``: ``sdpa`` (fused kernels: no score matrix kept) or ``eager`` (``[heads, T, T]`` fp32 softmax
    kept per layer for backward).
    """

    seq_len: int = 2048
    micro_batch: int = 1
    gpus: int = 1
    device: str = "cuda"
    teacher: str = "live"
    kd: str = "full"  # full | sampled | topk
    kd_k: int = 256
    gradient_checkpointing: bool = False
    quantize_embeddings: bool = False
    attention: str = "sdpa"
    fake_quant_cache: bool | None = None  # None = auto: on unless FSDP (gpus > 1), as train.py

    def __post_init__(self):
        for name in ("seq_len", "micro_batch", "gpus", "kd_k"):
            _positive(name.replace("_", "-"), getattr(self, name))
        for name, value, valid in (("device", self.device, ("cuda", "cpu")), ("teacher", self.teacher,
                                   ("live", "cache")), ("kd", self.kd, ("full", "sampled", "topk")),
                                   ("attention", self.attention, ("sdpa", "eager"))):
            if value not in valid:
                raise MemoryInputError(f"unknown {name} {value!r}; choose one of: {', '.join(valid)}")
        if self.teacher == "cache" and self.kd == "full":
            object.__setattr__(self, "kd", "topk")  # a cache stores sparse targets only (teacher-cache's default)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def compute_bytes(self) -> int:
        return 2 if self.device == "cuda" else 4

    @property
    def cache_on(self) -> bool:
        return self.gpus == 1 if self.fake_quant_cache is None else self.fake_quant_cache


# Elements kept for backward per token and layer (HF Gemma 3 decoder layer, eager autograd; an estimate):
#   4 RMSNorms (input, post-attention, pre-FFN, post-FFN) keep input and output: 8 x hidden, fp32 always;
#   q/k norms keep input and output: 2 q + 2 kv; sdpa keeps q, k and v expanded to all heads (repeat_kv) and the
#   output: 4 q; o_proj keeps its input: 1 q; the GeGLU keeps gate, gelu(gate), up and the product: 4 ffn.
# The matmul inputs (the normed hidden state) are the norms' outputs, already counted.
NORM_ELEMENTS_PER_HIDDEN = 8
ACT_ELEMENTS = {"ffn": 4, "q": 7, "kv": 2}
# Logit-sized [tokens, vocab] fp32 buffers alive at the loss's backward: student logits (compute dtype), their
# fp32 copy / temperature, log-softmax (kept), its gradient; live full KD: teacher logits, fp32 softmax, product.
STUDENT_LOGIT_COPIES = 3
EAGER_SCORE_COPIES = 2  # eager attention keeps the fp32 softmax and its (dropout) output for the value matmul
TEACHER_LOGIT_COPIES = {"full": 3, "sampled": 2, "topk": 2}


@dataclass
class TrainingMemory:
    """Per-GPU bytes by component and the peak, for one setup. ``phases``: the three candidate peaks."""

    model: str
    options: TrainingOptions
    components: dict[str, int]
    phases: dict[str, int]
    notes: list[str]

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def upper_bound(self) -> int:
        return sum(self.components.values())


def _activation_elements_per_token_layer(spec: ModelSpec) -> tuple[int, int]:
    """(fp32 elements, compute-dtype elements) kept per token in one decoder layer."""
    other = ACT_ELEMENTS["ffn"] * spec.ffn + ACT_ELEMENTS["q"] * spec.q_dim + ACT_ELEMENTS["kv"] * spec.kv_dim
    return NORM_ELEMENTS_PER_HIDDEN * spec.hidden, other


def activation_bytes(spec: ModelSpec, opts: TrainingOptions) -> int:
    """Activations kept for backward (per GPU: each GPU runs its own micro-batch, FSDP shards no activations).

    Without checkpointing every layer keeps its set; with it each layer keeps only its input (the fp32 residual
    stream, ``hidden`` per token) and one layer's set is live during its recompute. Eager attention adds the
    score matrices ``[heads, T, T]`` per sequence and layer (sliding layers too: HF masks a full T x T matrix).
    """
    fp32, other = _activation_elements_per_token_layer(spec)
    per_layer = opts.tokens * (4 * fp32 + opts.compute_bytes * other)
    scores = 0
    if opts.attention == "eager":
        scores = EAGER_SCORE_COPIES * 4 * spec.heads * opts.seq_len * opts.seq_len * opts.micro_batch
    if opts.gradient_checkpointing:
        return 4 * opts.tokens * spec.hidden * spec.layers + per_layer + scores
    return (per_layer + scores) * spec.layers


def logit_bytes(spec: ModelSpec, opts: TrainingOptions) -> int:
    """The [tokens, vocab] buffers of the loss (the vocabulary makes them the largest activations of Gemma 3)."""
    row = opts.tokens * spec.vocab * 4
    student = STUDENT_LOGIT_COPIES * row
    if opts.teacher == "cache":
        return student + opts.tokens * opts.kd_k * 12  # int64 ids + fp32 log-probs
    return student + TEACHER_LOGIT_COPIES[opts.kd] * row


def training_memory(model: str | ModelSpec, opts: TrainingOptions | None = None, **kwargs) -> TrainingMemory:
    """Per-GPU training memory of QAT by distillation, by component, and the estimated peak.

    Persistent: student fp32 latent weights (all of them, the frozen vision tower too), AdamW's two fp32 states
    and, in the backward pass, fp32 gradients of the trainable (text) parameters; under FSDP (``gpus`` > 1) these
    three are sharded over the GPUs, plus the gathered units (the root: embedding and final norm, and two decoder
    layers: current and prefetched) in the compute dtype. The teacher (live mode) is never sharded. The
    fake-quant cache keeps an fp32 copy of the quantized weights between steps (on unless FSDP). Weight copies
    kept for backward: autocast's bf16 copy of every matmul weight (CUDA), or the fake-quantized values when no
    cache holds them; with checkpointing only one layer's.

    Peak: activations are freed during backward as gradients appear, and the optimizer step runs after both, so
    the peak is the largest of three phases: (1) persistent + activations + logits + the embedding's gradient
    (the tied head's, computed first); (2) persistent + all gradients; (3) persistent + gradients + the foreach
    AdamW temporaries (one fp32 copy of the shard on CUDA).
    """
    spec = model_spec(model)
    opts = opts or TrainingOptions(**kwargs)
    c = param_counts(spec)
    n = opts.gpus
    trainable = c.text
    quantized = c.matmul + (c.embedding if opts.quantize_embeddings else 0)
    teacher_bytes = 2 if opts.device == "cuda" else 4
    per_layer_params = (c.matmul + c.norms - spec.hidden) // spec.layers
    comp: dict[str, int] = {}
    comp["teacher weights"] = c.total * teacher_bytes if opts.teacher == "live" else 0
    comp["student weights (fp32)"] = c.total * 4 // n
    gathered = (c.embedding + spec.hidden + 2 * per_layer_params) * opts.compute_bytes
    comp["fsdp gathered units"] = gathered if n > 1 else 0
    comp["fake-quant cache (fp32)"] = quantized * 4 if opts.cache_on else 0
    layer_share = 1 / spec.layers if opts.gradient_checkpointing else 1.0
    if opts.device == "cuda":
        copies = (c.matmul * layer_share + c.embedding) * 2  # autocast's bf16 weight copies (head included)
    else:
        copies = 0 if opts.cache_on else quantized * 4 * layer_share
    comp["weight copies kept for backward"] = int(copies)
    comp["gradients (fp32)"] = trainable * 4 // n
    comp["adamw states (2 x fp32)"] = trainable * 8 // n
    comp["activations"] = activation_bytes(spec, opts)
    comp["logits and loss"] = logit_bytes(spec, opts)
    comp["optimizer step temporaries"] = trainable * 4 // n if opts.device == "cuda" else 0
    persistent = sum(comp[k] for k in ("teacher weights", "student weights (fp32)", "fsdp gathered units",
                                       "fake-quant cache (fp32)", "adamw states (2 x fp32)"))
    phases = {
        "forward/backward": persistent + comp["weight copies kept for backward"] + comp["activations"]
        + comp["logits and loss"] + c.embedding * 4,
        "end of backward": persistent + comp["gradients (fp32)"],
        "optimizer step": persistent + comp["gradients (fp32)"] + comp["optimizer step temporaries"],
    }
    notes = [f"tokens per GPU and micro-step: {opts.tokens:,} ({opts.micro_batch} x {opts.seq_len:,})"]
    if opts.seq_len > spec.context:
        notes += _context_warnings(spec, opts.seq_len)
    if n > 1:
        notes.append(f"FSDP over {n} GPUs: student weights, gradients and AdamW states sharded; activations, "
                     "logits and the live teacher are not")
    return TrainingMemory(spec.name, opts, comp, phases, notes)


# ============================================================================================= measure a GGUF file


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


_FILE_TYPE_FORMATS = {int(FILE_TYPES[t]): name for name, t in PLAIN_TYPES.items()}  # general.file_type -> type


def _spec_from_gguf(reader, path: Path) -> tuple[ModelSpec, str]:
    """The architecture from the file's own metadata (what llama.cpp reads), and the architecture name."""
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
        return spec, arch
    if arch == "clip":
        p = "clip.vision."
        vision = VisionSpec(_field(reader, p + "image_size"), _field(reader, p + "patch_size"),
                            _field(reader, p + "block_count"), _field(reader, p + "embedding_length"),
                            _field(reader, p + "feed_forward_length"))
        hidden = _field(reader, p + "projection_dim")
        return ModelSpec(path.stem, 0, hidden, 0, 1, 1, 1, 1, 1, 0, (), vision, source=str(path)), arch
    raise NotGemma3Error(f"{path} is a {arch!r} GGUF, not a Gemma 3 model or its mmproj file")


def _file_format(reader, requested: str | None) -> tuple[str, bool]:
    """(format, embedding trained quantized) as recorded by our exporter, else from general.file_type."""
    if requested:
        return requested, False
    recorded = _field(reader, "gemma3_qat.format")
    if recorded in QAT_FORMATS:
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
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    reader = GGUFReader(str(path))
    spec, arch = _spec_from_gguf(reader, path)
    fmt, emb_quantized = _file_format(reader, format)
    if emb_quantized and embedding == "auto":
        embedding = "quantized"
    opts = WeightOptions(fmt, "gguf", embedding, "auto")
    if arch == "clip":
        predicted = [_gguf_stored(t, opts) for t in _vision_tensors(spec.vision, spec.hidden)]
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


# ============================================================================================= CI baseline

BASELINE_MODELS = tuple(GEMMA3_SHAPES)


def _tiny_specs() -> dict[str, ModelSpec]:
    """The tiny test models (gemma3_qat.embedded.tiny) with the fixture tokenizer's default vocabulary."""
    import inspect

    from gemma3_qat.embedded.tiny import build_tokenizer, tiny_multimodal_config, tiny_text_config

    vocab = inspect.signature(build_tokenizer).parameters["vocab_size"].default
    return {"tiny-text": spec_from_hf_config(tiny_text_config(vocab), "tiny-text", "gemma3_qat.embedded.tiny"),
            "tiny-multimodal": spec_from_hf_config(tiny_multimodal_config(vocab, 0, 0, 0), "tiny-multimodal",
                                                   "gemma3_qat.embedded.tiny")}


def baseline_cells(context: int = TABLE3_CONTEXT, kv_dtype: str = "bf16") -> dict[str, int]:
    """First-principles bytes: the four sizes x formats x containers x {weights, +kv}; and the tiny exports'
    GGUF tensor data (text file; mmproj file), which the export tests measure exactly."""
    cells: dict[str, int] = {}
    for name in BASELINE_MODELS:
        kv = kv_cache(name, context, dtype=kv_dtype).total
        for fmt in TABLE_FORMATS:
            for container in CONTAINERS:
                w = weight_bytes(name, WeightOptions(fmt, container)).total
                cells[f"{name}/{fmt}/{container}/weights"] = w
                cells[f"{name}/{fmt}/{container}/+kv"] = w + kv
    for name, spec in _tiny_specs().items():
        text_only = replace(spec, vision=None)
        for fmt in QAT_FORMATS:
            cells[f"{name}/{fmt}/gguf/tensor-data"] = weight_bytes(text_only, WeightOptions(fmt, "gguf")).total
        if spec.vision:
            mm = weight_bytes(spec, WeightOptions("int4-block", "gguf"))
            cells[f"{name}/mmproj/gguf/tensor-data"] = mm.by_group["vision"] + mm.by_group["projector"]
    return cells


def make_baseline(context: int = TABLE3_CONTEXT, kv_dtype: str = "bf16") -> dict:
    return {"about": "gemma3-qat memory first-principles bytes; regenerate deliberately with "
                     "`gemma3-qat memory --update-baseline benchmarks/memory-baseline.json`",
            "units": "bytes", "kv_context": context, "kv_dtype": kv_dtype,
            "cells": baseline_cells(context, kv_dtype)}


def write_baseline(path: str | Path) -> dict:
    baseline = make_baseline()
    Path(path).write_text(json.dumps(baseline, indent=1) + "\n")
    return baseline


@dataclass
class Drift:
    cell: str
    baseline: int | None
    current: int | None

    @property
    def relative(self) -> float:
        if not self.baseline or self.current is None:
            return math.inf
        return self.current / self.baseline - 1


def check_baseline(path: str | Path, tolerance: float = 0.0) -> list[Drift]:
    """Cells whose current value differs from the baseline by more than ``tolerance`` (relative); cells that
    appeared or disappeared count as drifted."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"baseline {path} does not exist; create it with --update-baseline {path}")
    if tolerance < 0:
        raise MemoryInputError(f"--tolerance must be 0 or more, got {tolerance}")
    stored = json.loads(path.read_text())
    current = baseline_cells(stored.get("kv_context", TABLE3_CONTEXT), stored.get("kv_dtype", "bf16"))
    old = stored.get("cells", {})
    drifts = []
    for cell in sorted(set(old) | set(current)):
        d = Drift(cell, old.get(cell), current.get(cell))
        if d.baseline is None or d.current is None or abs(d.relative) > tolerance:
            drifts.append(d)
    return drifts


# ============================================================================================= rendering


@dataclass
class Table:
    """A view: a title, column names, rows of cells and notes; printable as text, markdown or CSV."""

    title: str
    columns: list[str]
    rows: list[list]
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """What the CLI prints: the structured result (for --json) and its tables; ``failed`` makes it exit 1."""

    data: object
    tables: list[Table]
    failed: bool = False

    def render(self, style: str = "text") -> str:
        return to_json(self.data) if style == "json" else render(self.tables, style)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value + 0.0:,.3f}"  # + 0.0: no "-0.000"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def _looks_numeric(text: str) -> bool:
    return text == "" or text.replace(",", "").replace(".", "", 1).lstrip("+-").isdigit()


def _render_text(table: Table) -> str:
    cells = [[_cell(v) for v in row] for row in table.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(table.columns)]
    numeric = [bool(cells) and all(_looks_numeric(r[i]) for r in cells) for i in range(len(table.columns))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = [table.title]
    if cells:  # an empty table (e.g. no drifted cells) is just its title and notes
        lines += [line(table.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(lines + [f"  {n}" for n in table.notes]) + "\n"


def _render_markdown(table: Table) -> str:
    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in table.notes]) + "\n"


def _render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f"# {table.title}"])
    writer.writerow(table.columns)
    writer.writerows([["" if v is None else v for v in row] for row in table.rows])
    return buf.getvalue()


def render(tables: list[Table], style: str = "text") -> str:
    """``text`` (aligned columns), ``markdown`` or ``csv``."""
    renderer = {"text": _render_text, "markdown": _render_markdown, "csv": _render_csv}.get(style)
    if renderer is None:
        raise MemoryInputError(f"unknown output style {style!r}; choose text, markdown, csv or json")
    return "\n".join(renderer(t) for t in tables)


def to_json(obj) -> str:
    """Any result of this module as JSON (dataclasses as dicts, with their derived totals)."""
    def default(o):
        if hasattr(o, "__dataclass_fields__"):
            d = {k: getattr(o, k) for k in o.__dataclass_fields__}
            for name, attr in vars(type(o)).items():
                if isinstance(attr, property):
                    d[name] = getattr(o, name)
            return d
        raise TypeError(f"{type(o).__name__} is not JSON serializable")
    return json.dumps(obj, default=default, indent=2)


def _unit(largest: float) -> tuple[str, float]:
    """GB for real models, MB or KB for the tiny ones (so that they do not print as 0.000)."""
    for name, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if largest >= size / 10:
            return name, size
    return "bytes", 1.0


def _unit_label(unit: str, size: float) -> str:
    return unit if size == 1.0 else f"{unit} = 1e{round(math.log10(size))} bytes"


def _scaled(nbytes: float, size: float) -> float | int:
    return nbytes if size == 1.0 else round(nbytes / size, 3)


def _gb(nbytes: float) -> float:
    return round(nbytes / GB, 3)


def overview_report(context: int = TABLE3_CONTEXT, *, batch: int = 1, kv_dtype: str = "bf16",
                    formats=TABLE_FORMATS, embedding: str = "auto", vision: str = "auto") -> Report:
    """The four released sizes: weights per format in both containers, KV cache, totals (first principles)."""
    rows, data = [], []
    for name in BASELINE_MODELS:
        kv = kv_cache(name, context, batch=batch, dtype=kv_dtype)
        for fmt in formats:
            emb = embedding_for(fmt, embedding)
            gguf = weight_bytes(name, WeightOptions(fmt, "gguf", emb, vision))
            compact = weight_bytes(name, WeightOptions(fmt, "compact", emb, vision))
            rows.append([name, fmt, _gb(gguf.total), _gb(compact.total), _gb(kv.total), _gb(gguf.total + kv.total),
                         _gb(compact.total + kv.total), _gb(kv.every_layer_global)])
            data.append({"model": name, "format": fmt, "gguf": gguf, "compact": compact, "kv": kv})
    title = (f"Gemma 3 memory, first principles (GB = 1e9 bytes): weights, and + the 5:1 {kv_dtype} KV cache at "
             f"{context:,} tokens, batch {batch}")
    notes = ["gguf = what `gemma3-qat export --to gguf` writes (+ mmproj for 4B+); compact = compressed-tensors /"
             " gemma.cpp (int4 4 bits + fp16 scales, sfp8 1 byte + fp32 tensor scale)",
             f"embedding {embedding}: gguf Q8_0 (the exporter's auto), compact bf16; --model NAME for the details",
             "KV all-global: every layer holding the whole context (llama.cpp swa_full=True)"]
    notes += [f"warning: {w}" for w in sorted({w for d in data for w in d["kv"].warnings})]
    table = Table(title, ["model", "format", "gguf", "compact", "KV 5:1", "gguf+KV", "compact+KV", "KV all-global"],
                  rows, notes)
    return Report(data, [table])


def model_report(model: str | ModelSpec, formats=TABLE_FORMATS, containers=CONTAINERS, *, context: int = 32_768,
                 batch: int = 1, kv_dtype: str = "bf16", embedding: str = "auto", vision: str = "auto") -> Report:
    """One model: parameters by group, bytes by group per format and container, KV cache by layer type."""
    spec = model_spec(model)
    counts = param_counts(spec)
    kv = kv_cache(spec, context, batch=batch, dtype=kv_dtype)
    groups = [g for g in GROUPS if getattr(counts, g)]
    header = (f"Gemma 3 {spec.name} ({spec.source}): {spec.layers} layers ({spec.global_layers} global, "
              f"{spec.local_layers} local, window {spec.sliding_window:,}), hidden {spec.hidden:,}, vocab "
              f"{spec.vocab:,}, max context {spec.context:,}")
    params = Table(header, ["group", "parameters", "millions"],
                   [[g, getattr(counts, g), f"{getattr(counts, g) / 1e6:,.1f}"] for g in groups]
                   + [["non-embedding (Table 1)", counts.non_embedding, f"{counts.non_embedding / 1e6:,.1f}"],
                      ["total", counts.total, f"{counts.total / 1e6:,.1f}"]])
    results = []
    for fmt in formats:
        for container in containers:
            emb = embedding_for(fmt, embedding)
            results.append(weight_bytes(spec, WeightOptions(fmt, container, emb, vision)))
    unit, size = _unit(max([w.total + kv.every_layer_global for w in results] + [1]))
    rows = [[w.format, w.container, w.types.get("embedding", "")] + [_scaled(w.by_group[g], size) for g in groups]
            + [_scaled(w.total, size), _scaled(w.total + kv.total, size)] for w in results]
    notes = list(dict.fromkeys(f"{w.format} {w.container}: {w.note}" for w in results if w.note))
    notes.append("gguf: norms F32, vision = the mmproj file (F16 matrices, F32 vectors); compact: unquantized "
                 "tensors bf16")
    weights = Table(f"weights by group ({_unit_label(unit, size)}); +KV = the 5:1 {kv_dtype} cache at {context:,} "
                    f"tokens, batch {batch}", ["format", "container", "emb type"] + groups + ["total", "+KV"],
                    rows, notes)
    kv_rows = [[f"global ({kv.global_layers} layers x {context:,} tokens)", _scaled(kv.global_bytes, size)],
               [f"local ({kv.local_layers} layers x {kv.local_tokens:,} tokens)", _scaled(kv.local_bytes, size)],
               ["total (5:1 sliding window)", _scaled(kv.total, size)],
               ["every layer global (llama.cpp swa_full=True)", _scaled(kv.every_layer_global, size)],
               ["saved by the sliding window", _scaled(kv.every_layer_global - kv.total, size)]]
    kv_table = Table(f"KV cache, {kv_dtype}, {context:,} tokens, batch {batch} ({unit}; "
                     f"{kv.bytes_per_token_layer:,} bytes per token and layer)", ["part", unit], kv_rows,
                     [f"warning: {w}" for w in kv.warnings])
    return Report({"model": spec, "params": counts, "weights": results, "kv": kv}, [params, weights, kv_table])


def table3_report(embedding: str = "auto") -> Report:
    result = table3(embedding=embedding)
    rows = [[f"{c.model.upper()}{' +KV' if c.kv else ''}", c.column, c.published, round(c.paper, 3), c.reproduced,
             round(c.residual, 3), round(c.first_principles, 3), round(c.difference, 3), c.reason]
            for c in result.cells]
    notes = [f"reproduced {result.reproduced} of {len(result.cells)} cells to the printed 0.1 GB",
             f"paper convention: {result.convention}",
             "first principles: exact counts; " + ", ".join(f"{k} in {v}" for k, v in result.homes.items())
             + f"; embedding {embedding}; +KV = the true 5:1 bf16 cache at {TABLE3_CONTEXT:,} tokens"]
    notes += [f"not reproduced: {c.model.upper()}{' +KV' if c.kv else ''} {c.column}: residual "
              f"{c.residual:+.3f} GB ({c.reason.split(';')[0]})" for c in result.misses]
    table = Table("Table 3 of the Gemma 3 report vs our reproduction (GB = 1e9 bytes)",
                  ["model", "column", "published", "paper conv.", "repro", "residual", "first princ.", "diff",
                   "reason"], rows, notes)
    return Report(result, [table])


def training_report(model: str | ModelSpec, base: TrainingOptions) -> Report:
    """Four scenarios side by side: live teacher or teacher cache, with and without gradient checkpointing."""
    scenarios = {
        "live teacher": replace(base, teacher="live", gradient_checkpointing=False),
        "live + ckpt": replace(base, teacher="live", gradient_checkpointing=True),
        "teacher cache": replace(base, teacher="cache", gradient_checkpointing=False),
        "cache + ckpt": replace(base, teacher="cache", gradient_checkpointing=True),
    }
    results = {k: training_memory(model, v) for k, v in scenarios.items()}
    first = next(iter(results.values()))
    unit, size = _unit(max(r.upper_bound for r in results.values()))
    rows = [[comp] + [_scaled(r.components[comp], size) for r in results.values()] for comp in first.components]
    rows += [[f"phase: {p}"] + [_scaled(r.phases[p], size) for r in results.values()] for p in first.phases]
    rows.append(["PEAK (estimate)"] + [_scaled(r.peak, size) for r in results.values()])
    rows.append(["sum of all (upper bound)"] + [_scaled(r.upper_bound, size) for r in results.values()])
    title = (f"QAT training memory per GPU, {first.model}: {base.gpus} GPU(s), {base.device}, micro-batch "
             f"{base.micro_batch} x {base.seq_len:,} tokens, KD {base.kd} ({_unit_label(unit, size)})")
    notes = first.notes + [
        "activations per token and layer: 8 hidden fp32 (norms) + 4 ffn + 7 q + 2 kv in the compute dtype; "
        "checkpointing keeps each layer's input and recomputes one layer",
        "logits: [tokens, vocab] fp32 buffers, 3 for the student + 3 (full KD) or 2 for a live teacher; a "
        "teacher cache holds k ids + log-probs per token",
        "peak = the largest phase (activations are freed as gradients appear); an estimate, checked against "
        "measured CPU peaks to within a factor of 2 (tests/test_memory.py)"]
    return Report(results, [Table(title, ["component"] + list(results), rows, notes)])


def measure_report(path: str | Path, *, format: str | None = None, embedding: str = "auto",
                   per_tensor: bool = False) -> Report:
    m = measure_gguf(path, format=format, embedding=embedding)
    by_part: dict[str, list[int]] = {}
    for t in m.tensors:
        key = "blk.* (layers)" if t.name.startswith("blk.") else (
            "v.blk.* (vision layers)" if t.name.startswith("v.blk.") else t.name)
        acc = by_part.setdefault(key, [0, 0, 0])
        acc[0] += 1
        acc[1] += t.predicted_bytes
        acc[2] += t.actual_bytes
    rows = [[k, v[0], v[1], v[2], v[2] - v[1]] for k, v in by_part.items()]
    rows.append(["TENSOR DATA", len(m.tensors), m.predicted_tensor_bytes, m.actual_tensor_bytes,
                 m.actual_tensor_bytes - m.predicted_tensor_bytes])
    verdict = "EXACT: every tensor matches the prediction" if m.exact else f"{len(m.mismatches)} tensor(s) differ"
    tables = [Table(f"{m.path} ({m.architecture}, format {m.format}, embedding {m.embedding}): {verdict}",
                    ["tensors", "count", "predicted bytes", "actual bytes", "diff"], rows,
                    [] if per_tensor else ["tensor by tensor: --csv or --json"]),
              Table("file layout (bytes)", ["part", "bytes"],
                    [["header (magic, version, counts)", m.header_bytes],
                     ["metadata key-values (tokenizer included)", m.metadata_bytes],
                     ["tensor infos", m.tensor_info_bytes], ["alignment padding", m.alignment_padding],
                     ["tensor data", m.actual_tensor_bytes], ["file", m.file_bytes]])]
    if m.mismatches:
        tables.append(Table("tensors that differ", ["tensor", "predicted", "bytes", "actual", "bytes", "why"],
                            [[t.name, t.predicted_type, t.predicted_bytes, t.actual_type, t.actual_bytes, t.note]
                             for t in m.mismatches]))
    if per_tensor:
        tables.append(Table("tensor by tensor", ["tensor", "predicted type", "predicted bytes", "actual type",
                                                 "actual bytes", "match", "note"],
                            [[t.name, t.predicted_type, t.predicted_bytes, t.actual_type, t.actual_bytes,
                              t.matches, t.note] for t in m.tensors]))
    return Report(m, tables)


def check_report(path: str | Path, tolerance: float = 0.0) -> Report:
    drifts = check_baseline(path, tolerance)
    rows = [[d.cell, d.baseline, d.current, "new/removed" if math.isinf(d.relative) else f"{d.relative:+.4%}"]
            for d in drifts]
    verdict = "no drift" if not drifts else f"{len(drifts)} drifted cell(s)"
    notes = [f"tolerance {tolerance:g} (relative)"]
    if drifts:
        notes.append(f"if the change is intended: gemma3-qat memory --update-baseline {path}")
    return Report({"baseline": str(path), "tolerance": tolerance, "drifted": drifts},
                  [Table(f"baseline {path}: {verdict}", ["cell", "baseline", "current", "relative"], rows, notes)],
                  failed=bool(drifts))


def update_baseline_report(path: str | Path) -> Report:
    baseline = write_baseline(path)
    return Report(baseline, [Table(f"wrote {path}: {len(baseline['cells'])} cells", ["cell", "bytes"],
                                   [[k, v] for k, v in baseline["cells"].items()])])


# ============================================================================================= plot

PLOT_CONTEXTS = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k


def plot(path: str | Path, model: str | ModelSpec = "27b", *, formats=TABLE_FORMATS, kv_dtype: str = "bf16",
         models=BASELINE_MODELS) -> Path:
    """Two panels: KV memory vs context (5:1 vs every layer global) for ``models``; weights + KV per format for
    ``model``. Needs matplotlib (optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MemoryInputError("--plot needs matplotlib: pip install matplotlib (or pip install "
                               "'gemma3-qat[plot]')") from None
    spec = model_spec(model)
    fig, (ax_kv, ax_total) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [c / 1024 for c in PLOT_CONTEXTS]
    for name in models:
        kvs = [kv_cache(name, c, dtype=kv_dtype) for c in PLOT_CONTEXTS]
        line, = ax_kv.plot(xs, [k.total / GB for k in kvs], marker="o", label=f"{name} 5:1")
        ax_kv.plot(xs, [k.every_layer_global / GB for k in kvs], ls="--", color=line.get_color(),
                   label=f"{name} every layer global")
    ax_kv.set(xscale="log", xlabel="context (k tokens)", ylabel="KV cache (GB)", title=f"KV cache, {kv_dtype}")
    ax_kv.set_xticks(xs, [f"{x:g}" for x in xs])
    ax_kv.legend(fontsize=7)
    for fmt in formats:
        w = weight_bytes(spec, WeightOptions(fmt, TABLE3_HOMES.get(fmt, "gguf"))).total
        ax_total.plot(xs, [(w + kv_cache(spec, c, dtype=kv_dtype).total) / GB for c in PLOT_CONTEXTS], marker="o",
                      label=f"{fmt} ({TABLE3_HOMES.get(fmt, 'gguf')})")
    ax_total.set(xscale="log", xlabel="context (k tokens)", ylabel="weights + KV (GB)",
                 title=f"{spec.name}: weights + 5:1 KV cache")
    ax_total.set_xticks(xs, [f"{x:g}" for x in xs])
    ax_total.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
