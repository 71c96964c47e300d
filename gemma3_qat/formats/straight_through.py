"""The straight-through estimator: the fake-quantized values forward, the gradient to the latent weight."""

from __future__ import annotations

import torch

from gemma3_qat.formats.weight_format import WeightFormat


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized values (in their own dtype: bf16 under autocast). Backward: the gradient passes
    to the latent weight unchanged, in the latent's dtype."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        ctx.latent_dtype = latent.dtype
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.latent_dtype), None


class _StraightThroughWithScale(torch.autograd.Function):
    """As ``_StraightThrough``, plus ``scale_grad * fmt.scale_gradient`` to the weights that set the scales."""

    @staticmethod
    def forward(ctx, latent, quantized, fmt, scale_grad):
        ctx.save_for_backward(latent)
        ctx.fmt, ctx.scale_grad = fmt, scale_grad
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad):
        (latent,) = ctx.saved_tensors
        grad = grad.to(latent.dtype)
        extra = ctx.fmt.scale_gradient(latent, grad)
        return (grad if extra is None else grad + ctx.scale_grad * extra), None, None, None


def straight_through(latent: torch.Tensor, quantized: torch.Tensor, *, fmt: "WeightFormat | None" = None,
                     scale_grad: float = 0.0) -> torch.Tensor:
    """``quantized`` in the forward pass, identity gradient to ``latent`` in the backward pass; with
    ``scale_grad > 0`` also ``scale_grad`` times the format's scale gradient (``WeightFormat.scale_gradient``)."""
    if torch.is_grad_enabled() and latent.requires_grad:
        if scale_grad and fmt is not None:
            return _StraightThroughWithScale.apply(latent, quantized, fmt, float(scale_grad))
        return _StraightThrough.apply(latent, quantized)
    return quantized


