"""Gemma 3 architecture facts: the released shapes, the layer pattern, and where things live in a checkpoint.

The one home for model-shape constants (1B/4B/12B/27B) and for "which modules are the language model's matmuls".
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from gemma3_qat.errors import InputError, MissingFileError

# The matmul weights of one decoder layer that QAT quantizes (gemma.cpp's SFP set; llama.cpp's Q4_0 set).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GLOBAL_LAYER_EVERY = 6  # 5 local (sliding-window) layers, then 1 global; layers 5, 11, 17, ... are global


@dataclass(frozen=True)
class Gemma3Shape:
    """One released Gemma 3 size (HF conversion script and gemma.cpp configs agree)."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int
    context: int
    query_pre_attn_scalar: int
    rope_scaling_factor: float | None  # linear scaling on global layers
    vision: bool  # has the SigLIP tower + projector
    nominal_params: float  # the "1B/4B/12B/27B" of the name, in parameters
    vocab: int = 262_144
    vocab_multimodal: int = 262_208  # HF multimodal configs pad the embedding to this
    rope_global: float = 1_000_000.0
    rope_local: float = 10_000.0
    rms_norm_eps: float = 1e-6

    @property
    def global_layers(self) -> int:
        return self.layers // GLOBAL_LAYER_EVERY

    @property
    def local_layers(self) -> int:
        return self.layers - self.global_layers


GEMMA3_SHAPES: dict[str, Gemma3Shape] = {
    s.name: s
    for s in (
        Gemma3Shape("1b", 26, 1152, 6912, 4, 1, 256, 512, 32_768, 256, None, False, 1e9),
        Gemma3Shape("4b", 34, 2560, 10240, 8, 4, 256, 1024, 131_072, 256, 8.0, True, 4e9),
        Gemma3Shape("12b", 48, 3840, 15360, 16, 8, 256, 1024, 131_072, 256, 8.0, True, 12e9),
        Gemma3Shape("27b", 62, 5376, 21504, 32, 16, 128, 1024, 131_072, 168, 8.0, True, 27e9),
    )
}

# SigLIP vision tower of the 4B/12B/27B models.
SIGLIP = dict(image_size=896, patch_size=14, layers=27, hidden=1152, ffn=4304, heads=16, tokens_per_image=256)


def layer_types(num_layers: int) -> list[str]:
    """Gemma 3's pattern: every 6th layer (1-based) is global ("full_attention"), the rest sliding-window."""
    return [
        "full_attention" if (i + 1) % GLOBAL_LAYER_EVERY == 0 else "sliding_attention" for i in range(num_layers)
    ]


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
    config = getattr(text, "config", None)
    if config is None or getattr(config, "model_type", "") not in ("gemma3_text", "gemma3"):
        found = getattr(config, "model_type", None)
        raise NotGemma3Error(f"expected a Gemma 3 model (model_type gemma3_text), got model_type {found!r}")
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


def resolve_model(name_or_path: str | None):
    """A local checkpoint directory, a hub id, or None for the embedded default model."""
    from pathlib import Path

    if name_or_path is None:
        from gemma3_qat.assets import default_model_path

        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise NotGemma3Error(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return str(path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return name_or_path  # a hub id
    raise MissingFileError(f"model {name_or_path} does not exist (neither a local directory nor a hub id)")


def hub_error(source: str, exc: Exception) -> MissingFileError:
    first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return MissingFileError(f"cannot get {source!r} from the hub ({first}); are you offline? pass a local "
                             "checkpoint directory with --model")


def load_gemma3(name_or_path: str | None, *, dtype=None, device=None, **kwargs):
    """Load a Gemma 3 checkpoint (text-only or multimodal) with transformers, with clear errors."""
    from transformers import AutoConfig, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    source = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise hub_error(source, e) from None
    if config.model_type not in ("gemma3", "gemma3_text"):
        raise NotGemma3Error(f"{source} is not a Gemma 3 checkpoint (model_type {config.model_type!r})")
    cls = Gemma3ForConditionalGeneration if config.model_type == "gemma3" else Gemma3ForCausalLM
    model = cls.from_pretrained(source, dtype=dtype, **kwargs)
    if device is not None:
        model.to(device)
    return model
