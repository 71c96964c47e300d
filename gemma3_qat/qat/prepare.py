"""Attach fake quantization to a Gemma 3 model, and take it off again.

``prepare`` swaps the language model's matmul Linears (q, k, v, o, gate, up, down in every layer) and, when asked,
the tied token embedding (lookup *and* output head read the same fake-quantized table, as llama.cpp will) for
fake-quant twins that share the original Parameters. The vision tower and multimodal projector are frozen and left
untouched; norms stay unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from gemma3_qat.formats import FormatError, get_format
from gemma3_qat.models import find_parts, quantizable_linears
from gemma3_qat.qat.fake_quant import FakeQuantEmbedding, FakeQuantizer, FakeQuantLinear
from gemma3_qat.errors import InputError


@dataclass(frozen=True)
class QATConfig:
    """What to fake-quantize. Validated on creation."""

    format: str
    quantize_embeddings: bool = False

    def __post_init__(self):
        get_format(self.format)  # raises FormatError naming the valid formats


@dataclass
class PrepareReport:
    config: QATConfig
    quantized: list[str] = field(default_factory=list)  # qualified module names now fake-quantized
    frozen: list[str] = field(default_factory=list)  # vision tower / projector


_CONFIG_ATTR = "_gemma3_qat_config"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def qat_config_of(model: nn.Module) -> QATConfig | None:
    """The QATConfig a model was prepared with, or None for a plain model."""
    return getattr(model, _CONFIG_ATTR, None)


def prepare(
    model: nn.Module,
    fmt: str | QATConfig,
    *,
    quantize_embeddings: bool = False,
    cache: bool = True,
    scale_grad: float = 0.0,
) -> PrepareReport:
    """Fake-quantize ``model`` in place; returns what was done. See the module docstring."""
    config = fmt if isinstance(fmt, QATConfig) else QATConfig(fmt, quantize_embeddings)
    if qat_config_of(model) is not None:
        raise InputError("model is already prepared for QAT; call unprepare(model) first")
    weight_format = get_format(config.format)
    parts = find_parts(model)
    linears = quantizable_linears(model)
    for name, linear in linears.items():
        try:
            weight_format.check_shape(tuple(linear.weight.shape))
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from None

    report = PrepareReport(config)
    for name, linear in linears.items():
        _set_submodule(model, name, FakeQuantLinear(linear, FakeQuantizer(weight_format, cache=cache, scale_grad=scale_grad)))
        report.quantized.append(name)

    if config.quantize_embeddings:
        embed = parts.text_model.embed_tokens
        weight_format.check_shape(tuple(embed.weight.shape))
        table_quantizer = FakeQuantizer(weight_format, cache=cache, scale_grad=scale_grad)  # one quantizer: lookup and head share it
        embed_name = (parts.text_prefix + "." if parts.text_prefix else "") + "embed_tokens"
        _set_submodule(model, embed_name, FakeQuantEmbedding(embed, table_quantizer))
        report.quantized.append(embed_name)
        head = parts.lm_head
        if head is not None:
            if head.weight is not embed.weight:
                raise InputError(
                    "the output head is not tied to the token embedding; Gemma 3 ties them (tie_word_embeddings)"
                )
            _set_submodule(model, "lm_head", FakeQuantLinear(head, table_quantizer))
            report.quantized.append("lm_head")

    for name, module in parts.frozen:
        module.requires_grad_(False)
        report.frozen.append(name)
    setattr(model, _CONFIG_ATTR, config)
    return report


def unprepare(model: nn.Module) -> nn.Module:
    """Swap every fake-quant module back to its plain class, sharing the (latent) Parameters. In place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            _set_submodule(model, name, module.to_linear())
        elif isinstance(module, FakeQuantEmbedding):
            _set_submodule(model, name, module.to_embedding())
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


def fake_quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """The distinct fake quantizers of a prepared model (the tied embedding and head share one)."""
    seen: dict[int, FakeQuantizer] = {}
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            seen.setdefault(id(module), module)
    return list(seen.values())


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off everywhere (e.g. to compare with the unquantized forward)."""
    for quantizer in fake_quantizers(model):
        quantizer.enabled = enabled
