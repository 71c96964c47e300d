"""Start QAT at the strongest post-training quantization: llama.cpp's imatrix-weighted scale search, kept on the
runtime rule.

``llama-quantize --imatrix`` writes Q4_0 blocks whose scale was searched: per block it tries ``d = m / -(8 + δ)``
for ``δ`` in ±0.1 … ±0.9 (``m`` the block's signed extreme) and the least-squares scale of each resulting code set,
and keeps the one with the smallest error weighted by ``imatrix[column] * sqrt(σ² + x²)`` (``σ²`` the row's mean
square; ``imatrix`` the column's mean squared activation over calibration text). Here the same search picks each
group's scale, and ``WeightFormat.latent_for_scales`` realises it by moving the latent weights (the extreme set to
``-8 D``, weights beyond it clamped), so Q4_0's runtime rule, which our fake quantizer, exporters and llama.cpp's
own re-quantization all apply, derives exactly that scale: step 0 of QAT is the searched PTQ, and every export
stays exact. A group keeps its weights when no candidate beats the rule's own scale.

    importance = activation_importance(model, input_ids)      # per quantized Linear: mean x^2 per input column
    report = search_scales(model, "int4-block", importance)     # in place, on the plain model, before prepare()

Linears only: the tied embedding (when trained quantized) keeps the rule's scales (its lookup has no activations to
weigh by). The search costs ~37 candidate quantizations per weight: seconds on small models, minutes at 27B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gemma3_qat.errors import InputError
from gemma3_qat.formats import WeightFormat, get_format
from gemma3_qat.models import quantizable_linears

DELTAS = tuple(0.1 * i for i in range(-9, 10) if i)  # make_qx_quants' iscale = -(8 + 0.1 i) / max
ROWS_PER_CHUNK = 256


def activation_importance(model: nn.Module, input_ids: torch.Tensor, micro_batch: int = 8) -> dict[str, torch.Tensor]:
    """Per quantizable Linear, the mean squared input activation of each column over the rows ``input_ids``
    ``[N, T]`` (llama-imatrix's statistic), from the model as it is (the unquantized one)."""
    linears = quantizable_linears(model)
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook(name):
        def record(_module, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            sums[name] += x.pow(2).sum(dim=0).to(torch.float64).cpu()
            counts[name] += x.shape[0]
        return record

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for s in range(0, input_ids.shape[0], micro_batch):
                model(input_ids=input_ids[s:s + micro_batch].to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / max(counts[name], 1)).to(torch.float32) for name in linears}


@dataclass
class SearchReport:
    groups: int = 0
    changed: int = 0  # groups whose scale the search moved
    error_rule: float = 0.0  # the importance-weighted squared error with the rule's scales, summed
    error_searched: float = 0.0

    def line(self) -> str:
        gain = 1 - self.error_searched / self.error_rule if self.error_rule else 0.0
        return (f"ptq_init imatrix: {self.changed:,} of {self.groups:,} groups took a searched scale; weighted "
                f"squared error {100 * gain:.1f}% below the runtime rule's")


def _weighted_error(values, target, weights):
    return (weights * (target - values).pow_(2)).sum(dim=-1)


def search_tensor(fmt: WeightFormat, weight: torch.Tensor, importance: torch.Tensor,
                  report: SearchReport | None = None) -> torch.Tensor:
    """The latent ``[rows, in]`` fp32 whose runtime-rule quantization is the searched one (see the module
    docstring)."""
    out = weight.detach().to(torch.float32).clone()
    for s in range(0, out.shape[0], ROWS_PER_CHUNK):
        w = out[s:s + ROWS_PER_CHUNK]
        groups = fmt.groups_of(w)  # [r, g, n]
        weights = (importance.to(w) * torch.sqrt(w.pow(2).mean(dim=1, keepdim=True) + w.pow(2))).reshape(groups.shape)
        m = fmt.extremes_of(w)  # the weight each group's runtime scale is read from
        best_err = _weighted_error(fmt.fake_quantize_values(w).reshape(groups.shape), groups, weights)
        rule_err = best_err.clone()
        best_scale = torch.zeros_like(best_err)  # 0: keep the group as it is
        for delta in DELTAS:
            iscale = -(8.0 + delta) / torch.where(m == 0, torch.ones_like(m), m)
            codes = torch.round(groups * iscale).clamp_(-8, 7)
            sumlx = (weights * groups * codes).sum(dim=-1)
            suml2 = (weights * codes * codes).sum(dim=-1)
            least_squares = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
            for d in ((1.0 / iscale).squeeze(-1), least_squares):
                D = d.to(torch.float16)
                ok = torch.isfinite(D) & (D != 0) & (torch.sign(D.float()) == -torch.sign(m.squeeze(-1)))
                D = torch.where(ok, D, torch.zeros_like(D))
                values = fmt.fake_quantize_values(fmt.latent_for_scales(w, D)).reshape(groups.shape)
                err = _weighted_error(values, groups, weights)
                better = ok & (err < best_err)
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, D.float(), best_scale)
        out[s:s + ROWS_PER_CHUNK] = fmt.latent_for_scales(w, best_scale.to(torch.float16))
        if report is not None:
            report.groups += best_err.numel()
            report.changed += int((best_scale != 0).sum())
            report.error_rule += float(rule_err.sum())
            report.error_searched += float(best_err.sum())
    return out


def searchable(fmt: str | WeightFormat) -> WeightFormat:
    """The format, if its scales can be searched (int4); else a one-line error naming the alternative."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if not hasattr(fmt, "latent_for_scales"):
        raise InputError(f"ptq_init: imatrix searches int4 scales; {fmt.name} has none to search (use ptq_init: rtn)")
    return fmt


def search_scales(model: nn.Module, fmt: str | WeightFormat, importance: dict[str, torch.Tensor]) -> SearchReport:
    """Move every quantizable Linear's weights of ``model`` (plain, not yet prepared) to its searched scales."""
    fmt = searchable(fmt)
    report = SearchReport()
    with torch.no_grad():
        for name, linear in quantizable_linears(model).items():
            latent = search_tensor(fmt, linear.weight, importance[name], report)
            linear.weight.copy_(latent.to(linear.weight.dtype))
    return report


def move_off_boundaries(model: nn.Module, fmt: str | WeightFormat, *, embedding: bool = False) -> str | None:
    """Move the latent weights of every quantizable Linear (and the tied embedding if ``embedding``) of ``model``
    (plain, not yet prepared) off ``fmt``'s rounding boundaries, codes unchanged (``WeightFormat.off_boundaries``).
    Returns a log line when more than 1% of the weights moved: then the checkpoint sits on a finer lattice than
    ``fmt`` (a model dequantized from a GGUF), where the first optimizer step would flip all of them at once."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    weights = [linear.weight for linear in quantizable_linears(model).values()]
    if embedding:
        weights.append(model.get_input_embeddings().weight)
    moved = total = 0
    with torch.no_grad():
        for w in weights:
            total += w.numel()
            for s in range(0, w.shape[0], ROWS_PER_CHUNK * 16):
                rows = w[s:s + ROWS_PER_CHUNK * 16]
                latent, n = fmt.off_boundaries(rows.float())
                if n:
                    rows.copy_(latent.to(rows.dtype))
                    moved += n
    if moved <= 0.01 * total:
        return None
    return (f"start: {moved:,} of {total:,} latent weights ({moved / total:.0%}) sat on {fmt.name}'s rounding "
            "boundaries (the checkpoint is on a finer lattice, as a model dequantized from a GGUF is) and moved a "
            "quarter step into their codes: the same quantized model, without the first step flipping them all")

