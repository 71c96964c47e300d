"""Attach fake quantization to a Gemma 3 model, and take it off again.

``prepare`` swaps the language model's matmul Linears (q, k, v, o, gate, up, down in every layer) and, when asked,
the tied token embedding (lookup *and* output head read the same fake-quantized table, as llama.cpp will) for
fake-quant twins that share the original Parameters. The vision tower and multimodal projector are frozen and left
untouched; norms stay unquantized.

Each quantized module gets its own ``FakeQuantizer`` of its lattice: the run's format for all of them, or, for a
mixture (``q4_k_m``), the lattice its policy gives that tensor (``mixtures.mixture_lattices``; the tied embedding
always, at the policy's type), or the lattices a run's qat.json recorded (``lattices``: eval re-applies them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from gemma3_qat.checkpoint import LATTICES_ATTR
from gemma3_qat.formats import FormatError, WeightFormat, get_format
from gemma3_qat.layout import text_gguf_name
from gemma3_qat.mixtures import mixture_lattices
from gemma3_qat.models import architecture_from_config, find_parts, quantizable_linears
from gemma3_qat.qat.fake_quant import FakeQuantEmbedding, FakeQuantizer, FakeQuantLinear
from gemma3_qat.errors import InputError


@dataclass(frozen=True)
class QATConfig:
    """What to fake-quantize. Validated on creation; a mixture always quantizes the tied embedding."""

    format: str
    quantize_embeddings: bool = False

    def __post_init__(self):
        if get_format(self.format).is_mixture:  # raises FormatError naming the valid formats
            object.__setattr__(self, "quantize_embeddings", True)


@dataclass
class PrepareReport:
    config: QATConfig
    quantized: list[str] = field(default_factory=list)  # qualified module names now fake-quantized
    frozen: list[str] = field(default_factory=list)  # vision tower / projector
    lattices: dict[str, str] = field(default_factory=dict)  # HF weight name -> its lattice (the tied head: none)


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
    lattices: Mapping[str, str] | None = None,
) -> PrepareReport:
    """Fake-quantize ``model`` in place; returns what was done. See the module docstring.

    ``lattices``: HF weight name -> lattice, as a run's qat.json records them (None: from ``fmt``)."""
    config = fmt if isinstance(fmt, QATConfig) else QATConfig(fmt, quantize_embeddings)
    if qat_config_of(model) is not None:
        raise InputError("model is already prepared for QAT; call unprepare(model) first")
    weight_format = get_format(config.format)
    parts = find_parts(model)
    linears = quantizable_linears(model)
    embed = parts.text_model.embed_tokens
    embed_name = (parts.text_prefix + "." if parts.text_prefix else "") + "embed_tokens"
    if lattices is None and weight_format.is_mixture:
        arch = architecture_from_config(model.config, weight_format.name, type(model).__name__)
        lattices = mixture_lattices(arch, weight_format.name)
    if lattices is not None:
        chosen = _by_module(lattices, [*linears, embed_name])
    else:
        _check_shapes(weight_format, linears)
        chosen = dict.fromkeys(linears, weight_format)
        if config.quantize_embeddings:
            weight_format.check_shape(tuple(embed.weight.shape))
            chosen[embed_name] = weight_format
    for name, f in chosen.items():
        try:
            f.check_shape(tuple(model.get_submodule(name).weight.shape))
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from None

    report = PrepareReport(config)
    for name, linear in linears.items():
        if name not in chosen:
            continue  # a mixture's policy keeps it unquantized (F16)
        _set_submodule(model, name, FakeQuantLinear(linear, FakeQuantizer(chosen[name], cache=cache,
                                                                          scale_grad=scale_grad)))
        report.quantized.append(name)

    if embed_name in chosen:
        # one quantizer: lookup and head share it
        table_quantizer = FakeQuantizer(chosen[embed_name], cache=cache, scale_grad=scale_grad)
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
    report.lattices = {f"{name}.weight": chosen[name].name for name in report.quantized if name in chosen}
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, LATTICES_ATTR, report.lattices)  # what write_qat_checkpoint records in qat.json
    return report


def _by_module(lattices: Mapping[str, str], modules: list[str]) -> dict[str, WeightFormat]:
    """Module name -> format of the modules ``lattices`` (HF weight names) lists, matched by GGUF name."""
    by_gguf = {text_gguf_name(n): get_format(lattice) for n, lattice in lattices.items()}
    if any(f.is_mixture for f in by_gguf.values()):
        raise FormatError("each tensor's lattice must be a lattice, not a mixture")
    out = {m: by_gguf[g] for m in modules if (g := text_gguf_name(m + ".weight")) in by_gguf}
    if len(out) != len(by_gguf):
        raise InputError(f"{len(by_gguf) - len(out)} of the {len(by_gguf)} tensors given lattices are not this "
                         "model's matmuls or embedding; is it the run's model?")
    return out


def _check_shapes(fmt: WeightFormat, linears: Mapping[str, nn.Linear]) -> None:
    """Refuse, in one line before any training, a format that cannot hold every matmul: the first, and how many."""
    bad = {}
    for name, linear in linears.items():
        try:
            fmt.check_shape(tuple(linear.weight.shape))
        except FormatError as e:
            bad[name] = str(e)
    if bad:
        name, why = next(iter(bad.items()))
        more = f" ({len(bad)} of the {len(linears)} matmuls have such rows)" if len(bad) > 1 else ""
        raise FormatError(f"{name}: {why}{more}")


def unprepare(model: nn.Module) -> nn.Module:
    """Swap every fake-quant module back to its plain class, sharing the (latent) Parameters. In place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            _set_submodule(model, name, module.to_linear())
        elif isinstance(module, FakeQuantEmbedding):
            _set_submodule(model, name, module.to_embedding())
    for attr in (_CONFIG_ATTR, LATTICES_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
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
