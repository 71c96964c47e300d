"""Gemma 3 architecture facts: the released shapes, the layer pattern, and where things live in a checkpoint.

The one home for model-shape constants (1B/4B/12B/27B) and for "which modules are the language model's matmuls":
one ``Architecture`` record per model (a released size, a checkpoint's config, a GGUF file's metadata), from which
its HF config (``hf_config``), its stored tensors by group (``model_tensors``) and the memory model's counts are
derived; and the one "is this Gemma 3" check (``is_multimodal_gemma3``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from gemma3_qat.errors import InputError

# The matmul weights of one decoder layer that QAT quantizes (gemma.cpp's SFP set; llama.cpp's Q4_0 set).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GLOBAL_LAYER_EVERY = 6  # 5 local (sliding-window) layers, then 1 global; layers 5, 11, 17, ... are global
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types names
GEMMA3_MODEL_TYPES = {"gemma3_text": False, "gemma3": True}  # model_type -> multimodal (SigLIP tower + projector)
ROLES = ("embedding", "attention", "mlp", "norms", "vision", "projector")  # every stored tensor is one of these
QUANTIZED_GROUPS = ("attention", "mlp")  # the tensor groups QAT quantizes (the embedding only on request)


def layer_types(num_layers: int) -> list[str]:
    """Gemma 3's pattern: every 6th layer (1-based) is global ("full_attention"), the rest sliding-window."""
    return [FULL if (i + 1) % GLOBAL_LAYER_EVERY == 0 else SLIDING for i in range(num_layers)]


def _check_positive(record, names) -> None:
    for name in names:
        value = getattr(record, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{type(record).__name__}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class VisionTower:
    """A SigLIP vision tower's shape: what its parameter count, the HF config and the mmproj file need."""

    image_size: int
    patch_size: int
    layers: int
    hidden: int
    ffn: int
    heads: int = 16
    tokens_per_image: int = 256  # soft tokens per image after the projector's pooling
    channels: int = 3
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_positive(self, ("image_size", "patch_size", "layers", "hidden", "ffn", "heads", "tokens_per_image",
                               "channels"))

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# SigLIP so400m of the 4B/12B/27B models.
SIGLIP = VisionTower(image_size=896, patch_size=14, layers=27, hidden=1152, ffn=4304, heads=16, tokens_per_image=256)


@dataclass(frozen=True)
class Architecture:
    """One Gemma 3 architecture: a released size, a checkpoint's config or a GGUF file's metadata.

    The one record the rest derives from: the HF config (``hf_config``), the stored tensors by group
    (``model_tensors``: what memory counts and which are quantized), the KV cache's layer split. Validated on
    creation; ``layer_types`` defaults to Gemma 3's 5 local : 1 global pattern.
    """

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
    layer_types: tuple[str, ...] = ()
    vision: VisionTower | None = None  # the SigLIP tower + projector of multimodal checkpoints
    nominal_params: float | None = None  # the "27B" (or "270M") of the name, for Table 3's convention
    source: str = "built-in"
    query_pre_attn_scalar: int | None = None  # None: head_dim (the tiny models; llama.cpp uses head_dim anyway)
    rope_scaling_factor: float | None = None  # linear scaling on global layers
    rope_global: float = 1_000_000.0
    rope_local: float = 10_000.0
    rms_norm_eps: float = 1e-6
    # what the runtimes' own model code hard-codes for Gemma 3 (gemma.cpp refuses a checkpoint that differs)
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    bidirectional_attention: bool = False
    tied_embeddings: bool = True
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)

    def __post_init__(self):
        _check_positive(self, ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "sliding_window",
                               "context", "vocab"))
        types = tuple(self.layer_types) or tuple(layer_types(self.layers))
        if len(types) != self.layers or not set(types) <= {FULL, SLIDING}:
            raise InputError(f"{self.name}: layer_types must list {FULL!r} or {SLIDING!r} for each of the "
                             f"{self.layers} layers, got {len(types)} entries")
        object.__setattr__(self, "layer_types", types)

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

    def rope_base(self, layer_type: str) -> float:
        """The RoPE base of a layer type (``FULL`` global, ``SLIDING`` local)."""
        return self.rope_global if layer_type == FULL else self.rope_local

    @property
    def query_scalar(self) -> int:
        """``query_pre_attn_scalar``: queries are scaled by its inverse square root (head_dim when unset)."""
        return self.query_pre_attn_scalar or self.head_dim

    def gemma_cpp_identity(self) -> tuple[str, str]:
        """The gemma.cpp ``Model`` to write in a ``.sbs`` of this architecture, and why.

        Always ``GEMMA3_1B``: gemma.cpp gives a global layer RoPE base 1e6 only for the four Gemma 3 identities
        1B/4B/12B/27B (``IsVLM``); its own 270M identity puts 1e4 on the global layers (measured: KL 1.4e-2 against
        transformers instead of 2.4e-4), and a ``.sbs`` we write holds the text model only, which is what the 1B
        identity describes. Nothing else gemma.cpp computes depends on the identity: the shapes, window per layer,
        query scale and caps are written in the config itself."""
        reason = ("the text-only Gemma 3 identity: global layers at RoPE 1e6 (gemma.cpp's 270M identity puts 1e4 "
                  "there), shapes and windows from the config")
        return "GEMMA3_1B", reason

    def tensors(self) -> list[TensorSpec]:
        """Every stored tensor (the tied head is the embedding: not listed twice): text model, then vision."""
        out = text_tensors(self)
        if self.vision:
            out += vision_tensors(self.vision, self.hidden)
        return out


Gemma3Shape = Architecture  # the released sizes' record keeps its old name


def _nominal(name: str) -> float:
    """The size in the name: "270m" -> 270e6, "27b" -> 27e9."""
    return float(name[:-1]) * {"m": 1e6, "b": 1e9}[name[-1]]


def _released(name, layers, hidden, ffn, heads, kv_heads, head_dim, window, context, scalar, rope_factor,
              vision) -> Architecture:
    return Architecture(
        name, layers, hidden, ffn, heads, kv_heads, head_dim, window, context,
        vocab=262_208 if vision else 262_144,  # HF multimodal configs pad the embedding to 262,208 rows
        vision=SIGLIP if vision else None, nominal_params=_nominal(name), query_pre_attn_scalar=scalar,
        rope_scaling_factor=rope_factor,
    )


# The released sizes (the HF conversion script and gemma.cpp's configs agree). 270m: the hub config.json of
# google/gemma-3-270m (transformers 4.55: 18 layers, 640 wide, 4 heads / 1 KV head of 256, window 512, 32k context,
# query_pre_attn_scalar 256, RoPE 1e4 local / 1e6 global, unscaled, text only) and llama.cpp's GGUF of it agree;
# its embedding is 167.8M of its 268.1M parameters.
GEMMA3_SHAPES: dict[str, Architecture] = {
    s.name: s
    for s in (
        _released("270m", 18, 640, 2048, 4, 1, 256, 512, 32_768, 256, None, False),
        _released("1b", 26, 1152, 6912, 4, 1, 256, 512, 32_768, 256, None, False),
        _released("4b", 34, 2560, 10240, 8, 4, 256, 1024, 131_072, 256, 8.0, True),
        _released("12b", 48, 3840, 15360, 16, 8, 256, 1024, 131_072, 256, 8.0, True),
        _released("27b", 62, 5376, 21504, 32, 16, 128, 1024, 131_072, 168, 8.0, True),
    )
}


# ------------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: its HF name (transformers 5 layout), torch shape ``[out, in]`` and group."""

    name: str
    shape: tuple[int, ...]
    group: str  # embedding, attention, mlp, norms, vision, projector

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matmul(self) -> bool:
        """A language-model matmul weight: what QAT quantizes (``quantizable_linears`` finds the same modules)."""
        return self.group in QUANTIZED_GROUPS


def text_tensors(arch: Architecture) -> list[TensorSpec]:
    """The language model's tensors: embedding, per layer q/k/v/o, q/k norms, gate/up/down and 4 norms, final norm."""
    prefix = "model.language_model." if arch.vision else "model."
    h, q, kv, f, d = arch.hidden, arch.q_dim, arch.kv_dim, arch.ffn, arch.head_dim
    out = [TensorSpec(f"{prefix}embed_tokens.weight", (arch.vocab, h), "embedding")]
    attn = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    mlp = {"gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    for i in range(arch.layers):
        base = f"{prefix}layers.{i}."
        out += [TensorSpec(f"{base}self_attn.{n}.weight", attn[n], "attention") for n in ATTENTION_PROJECTIONS]
        out += [TensorSpec(f"{base}self_attn.{n}.weight", (d,), "norms") for n in ("q_norm", "k_norm")]
        out += [TensorSpec(f"{base}mlp.{n}.weight", mlp[n], "mlp") for n in MLP_PROJECTIONS]
        out += [TensorSpec(f"{base}{n}.weight", (h,), "norms") for n in (
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    out.append(TensorSpec(f"{prefix}norm.weight", (h,), "norms"))
    return out


def vision_tensors(v: VisionTower, text_hidden: int) -> list[TensorSpec]:
    """The SigLIP tower's tensors and the multimodal projector's (into a text model of width ``text_hidden``)."""
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


def model_tensors(arch: Architecture) -> list[TensorSpec]:
    """Every stored tensor of ``arch`` (``Architecture.tensors``)."""
    return arch.tensors()


# ------------------------------------------------------------------------------------------------- HF configs


def hf_config(arch: Architecture, *, image_token_index: int | None = None, boi_token_index: int | None = None,
              eoi_token_index: int | None = None):
    """The transformers config of ``arch``, as a released hub ``config.json`` describes it.

    Text-only gives a ``Gemma3TextConfig``, one with a vision tower a ``Gemma3Config`` (the image token ids
    default to transformers' defaults, the released ones). The one builder: the memory model checks its counts
    against models instantiated from it (on the ``meta`` device), and the tiny test models are built with it.
    """
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    full = {"rope_type": "default", "rope_theta": arch.rope_global}
    if arch.rope_scaling_factor:
        full = {"rope_type": "linear", "factor": arch.rope_scaling_factor, "rope_theta": arch.rope_global}
    text = Gemma3TextConfig(
        vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.ffn, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads, head_dim=arch.head_dim,
        sliding_window=arch.sliding_window, max_position_embeddings=arch.context,
        query_pre_attn_scalar=arch.query_pre_attn_scalar or arch.head_dim, layer_types=list(arch.layer_types),
        rope_parameters={FULL: full, SLIDING: {"rope_type": "default", "rope_theta": arch.rope_local}},
        rms_norm_eps=arch.rms_norm_eps, tie_word_embeddings=arch.tied_embeddings,
        hidden_activation=arch.hidden_activation, attention_bias=arch.attention_bias,
        use_bidirectional_attention=arch.bidirectional_attention,
        final_logit_softcapping=arch.final_logit_softcapping, attn_logit_softcapping=arch.attn_logit_softcapping,
        pad_token_id=0, bos_token_id=arch.bos_token_id,  # Gemma's SentencePiece ids (and transformers' defaults)
        eos_token_id=arch.eos_token_ids[0] if len(arch.eos_token_ids) == 1 else list(arch.eos_token_ids),
    )
    if not arch.vision:
        return text
    v = arch.vision
    vision = SiglipVisionConfig(
        hidden_size=v.hidden, intermediate_size=v.ffn, num_hidden_layers=v.layers, num_attention_heads=v.heads,
        image_size=v.image_size, patch_size=v.patch_size, num_channels=v.channels, layer_norm_eps=v.layer_norm_eps,
        vision_use_head=False,
    )
    ids = {k: i for k, i in (("image_token_index", image_token_index), ("boi_token_index", boi_token_index),
                             ("eoi_token_index", eoi_token_index)) if i is not None}
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        mm_tokens_per_image=v.tokens_per_image, tie_word_embeddings=arch.tied_embeddings, **ids)


def is_multimodal_gemma3(config, source: str, what: str = "checkpoint") -> bool:
    """THE "is this Gemma 3" check, for a transformers config, a ``config.json`` dict or a ``model_type``.

    True for a multimodal checkpoint (``gemma3``), False for a text-only one (``gemma3_text``); anything else
    raises ``NotGemma3Error`` naming ``source`` as a Gemma 3 ``what`` it is not.
    """
    if isinstance(config, dict):
        model_type = config.get("model_type")
    elif isinstance(config, str) or config is None:
        model_type = config
    else:
        model_type = getattr(config, "model_type", None)
    if model_type not in GEMMA3_MODEL_TYPES:
        raise NotGemma3Error(f"{source} is not a Gemma 3 {what} (model_type {model_type!r}); expected "
                             f"{' or '.join(GEMMA3_MODEL_TYPES)}")
    return GEMMA3_MODEL_TYPES[model_type]


def architecture_from_config(config, name: str, source: str) -> Architecture:
    """THE reader of a checkpoint's architecture: a ``config.json`` dict or a transformers ``Gemma3Config`` /
    ``Gemma3TextConfig``. Nothing else in the package reads a config's keys.

    A dict goes through transformers' own config classes first, so that a key a config leaves out takes
    transformers' default (a released 4B ``config.json`` omits ``head_dim``, ``max_position_embeddings``, ...) and
    the legacy RoPE keys (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``) become ``rope_parameters`` per
    layer type, as the model itself will see them."""
    if isinstance(config, dict):
        multimodal = is_multimodal_gemma3(config, source, "config")  # before transformers sees another model_type
        from transformers import Gemma3Config, Gemma3TextConfig

        config = (Gemma3Config if multimodal else Gemma3TextConfig).from_dict(config)
    multimodal = is_multimodal_gemma3(config, source, "config")
    text = config.text_config if multimodal else config
    vision = None
    if multimodal:
        v = config.vision_config
        vision = VisionTower(v.image_size, v.patch_size, v.num_hidden_layers, v.hidden_size, v.intermediate_size,
                             v.num_attention_heads, getattr(config, "mm_tokens_per_image", 256),
                             getattr(v, "num_channels", 3), getattr(v, "layer_norm_eps", 1e-6))
    types = tuple(getattr(text, "layer_types", None) or layer_types(text.num_hidden_layers))
    rope = getattr(text, "rope_parameters", None) or {}  # transformers 5: one entry per layer type
    full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
    eos = text.eos_token_id if text.eos_token_id is not None else getattr(config, "eos_token_id", 1)
    return Architecture(name, text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                        text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.sliding_window,
                        text.max_position_embeddings, text.vocab_size, types, vision, None, source,
                        query_pre_attn_scalar=getattr(text, "query_pre_attn_scalar", None),
                        rope_scaling_factor=full.get("factor") if full.get("rope_type") == "linear" else None,
                        rope_global=full.get("rope_theta", 1_000_000.0), rope_local=local.get("rope_theta", 10_000.0),
                        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
                        hidden_activation=getattr(text, "hidden_activation", None) or "gelu_pytorch_tanh",
                        attention_bias=bool(getattr(text, "attention_bias", False)),
                        bidirectional_attention=bool(getattr(text, "use_bidirectional_attention", False)),
                        tied_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
                        final_logit_softcapping=getattr(text, "final_logit_softcapping", None) or None,
                        attn_logit_softcapping=getattr(text, "attn_logit_softcapping", None) or None,
                        bos_token_id=text.bos_token_id if text.bos_token_id is not None else 2,
                        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))


architecture_from_hf_config = architecture_from_config  # the name callers of a transformers config use


def read_architecture(path, name: str | None = None) -> Architecture:
    """The architecture of a checkpoint directory (or its ``config.json``): ``architecture_from_config`` of the
    file, the model type checked before transformers reads it."""
    import json
    from pathlib import Path

    path = Path(path).expanduser()
    config_path = path if path.is_file() else path / "config.json"
    if not config_path.exists():
        raise NotGemma3Error(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{config_path} is not valid JSON ({e}); restore the checkpoint's config.json") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path} is not a JSON object; restore the checkpoint's config.json")
    return architecture_from_config(config, name or config_path.parent.name, str(config_path))


class NotGemma3Error(InputError):
    """The model or checkpoint is not a Gemma 3 language model."""


@dataclass
class Gemma3Parts:
    """Where the pieces of a loaded transformers Gemma 3 model are."""

    text_model: nn.Module  # Gemma3TextModel: embed_tokens, layers, norm
    lm_head: nn.Module | None  # tied to text_model.embed_tokens
    frozen: list[tuple[str, nn.Module]]  # vision tower and multimodal projector (never trained, never quantized)
    text_prefix: str  # the text model's qualified name inside the full model


def find_parts(model: nn.Module) -> Gemma3Parts:
    """Locate the text model, the tied head and the frozen multimodal parts of a Gemma 3 model.

    Works for ``Gemma3ForCausalLM`` (text-only, 1B style), ``Gemma3ForConditionalGeneration`` (4B+ style) and
    their bare ``Gemma3TextModel`` / ``Gemma3Model`` bodies.
    """
    named = dict(model.named_modules())
    for prefix in ("model.language_model", "language_model.model", "language_model", "model", ""):
        text = named.get(prefix)
        if text is not None and hasattr(text, "layers") and hasattr(text, "embed_tokens"):
            break
    else:
        raise NotGemma3Error(
            f"{type(model).__name__} is not a Gemma 3 model: no text model with `layers` and `embed_tokens` found"
        )
    is_multimodal_gemma3(getattr(text, "config", None), type(model).__name__, "model")
    frozen = [
        (name, named[name])
        for name in ("model.vision_tower", "model.multi_modal_projector", "vision_tower", "multi_modal_projector")
        if name in named
    ]
    return Gemma3Parts(text, getattr(model, "lm_head", None), frozen, prefix)


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The language model's matmul weights (q, k, v, o, gate, up, down of every layer) by qualified name."""
    parts = find_parts(model)
    found: dict[str, nn.Linear] = {}
    base = parts.text_prefix + "." if parts.text_prefix else ""
    for i, layer in enumerate(parts.text_model.layers):
        for group, names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", MLP_PROJECTIONS)):
            for name in names:
                module = getattr(getattr(layer, group), name)
                if not isinstance(module, nn.Linear):
                    raise NotGemma3Error(f"layer {i}: {group}.{name} is a {type(module).__name__}, not nn.Linear")
                found[f"{base}layers.{i}.{group}.{name}"] = module
    return found
