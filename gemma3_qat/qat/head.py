"""The LM head fused with what consumes its logits, chunk by chunk: no ``[tokens x vocab]`` tensor for a whole batch.

At Gemma 3's 262,144-piece vocabulary the logits, their softmaxes and gradients dominate training memory (fp32
logits of one 2,048-token sequence are 2.1 GB; student, teacher, softmaxes and gradients several times that).
Here the head matmul runs per chunk of ``chunk_rows(vocab)`` positions and each chunk is consumed at once:

* ``forward_with_head(model, consume, **inputs)`` runs the model's own forward with its ``lm_head`` replaced, for
  that one call, by a tap that hands the final hidden states and the head (``OutputHead``) to ``consume``
  *inside* the forward. The head is the weight exactly as the model's forward would use it (fake-quantized when
  the embedding is trained quantized; tied to the embedding or not: the ``lm_head`` module's weight either way),
  the matmul dtype autocast would pick, and the config's ``final_logit_softcapping`` where the model applies one
  (``Gemma3ForCausalLM`` does when it is set; Gemma 3's configs set None). Inside the forward matters under FSDP:
  the root unit (embedding = tied head, final norm) is gathered only between its pre- and post-forward hooks, and
  its pre-backward hook sits on the forward's outputs. So the weight read is the gathered one, and the consumer's
  differentiable result (the loss) is returned in the place of the logits, through the model's outputs.
* ``fused_head_loss(hidden, head, chunk_loss)``: per chunk, the logits, the chunk's loss and its gradient with
  respect to the logits (autograd over the very ops of the unfused loss), then ``dL/dh = g W`` and
  ``dL/dW += g^T h``, all in the forward pass; the backward only scales them by the incoming gradient. This is
  Liger-Kernel's fused linear cross-entropy / JSD scheme in plain torch (CPU and CUDA): the FLOPs of autograd
  through the full logits, no recomputation, and only one chunk's logit-sized buffers alive at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gemma3_qat.errors import InputError

LOGIT_CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 positions at Gemma 3's vocabulary (128 MiB in fp32)


def chunk_rows(vocab: int, budget: int = LOGIT_CHUNK_ELEMENTS) -> int:
    """Positions per chunk for a vocabulary (the memory model asks this too)."""
    return max(1, budget // vocab)


@dataclass
class OutputHead:
    """The LM head as the model's forward applies it: ``softcap(hidden @ weight.T)`` in ``dtype``."""

    weight: torch.Tensor  # [vocab, hidden], the tensor the gradient goes to (fake-quantized values, if any)
    softcap: float | None
    dtype: torch.dtype  # the matmul's: autocast's where it is on, else the weight's
    cast: torch.Tensor | None = None  # the weight in ``dtype`` (a fake quantizer's cached copy); None: cast here

    def __post_init__(self):
        if self.cast is None:  # once per call
            self.cast = self.weight if self.weight.dtype == self.dtype else self.weight.to(self.dtype)

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def matmul(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw logits (before soft-capping) of hidden rows (on the head's device: a model spread over devices)."""
        return F.linear(hidden.to(self.cast.device, self.dtype), self.cast)

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap(self.matmul(hidden))


def _inner(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / FSDP1 / torch.compile wrappers (FSDP2 wraps nothing)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise InputError(f"{type(model).__name__} has no lm_head module: the fused head needs a Gemma 3 causal LM")
    return model


def head_weight(module: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the head weight as the module's forward uses it: through its fake quantizer when it has one; its copy in
    the matmul ``dtype`` when the quantizer holds one, else None)."""
    if getattr(module, "bias", None) is not None:
        raise InputError("the lm_head has a bias; Gemma 3's has none, and the fused head does not add one")
    if module.weight.device.type == "meta":
        raise InputError("the lm_head's weight is offloaded (device_map put it on disk or in CPU RAM behind a hook); "
                         "load the model on devices that hold it")
    quantizer = getattr(module, "weight_fake_quant", None)
    if quantizer is None or not quantizer.enabled:
        return module.weight, None
    weight = quantizer(module.weight)
    cast = None if dtype in (None, weight.dtype) else quantizer.quantized_values(module.weight, dtype)
    return weight, cast


def _matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


class _HeadTap(nn.Module):
    """Stands in for ``lm_head`` during one forward: ``consume(hidden, head)`` instead of the full logits."""

    def __init__(self, head: nn.Module, consume: Callable, softcap: float | None):
        super().__init__()
        object.__setattr__(self, "_head", head)  # not a submodule: the model's parameters stay as they are
        self.consume, self.softcap, self.extras, self.returned = consume, softcap, None, False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = _matmul_dtype(self._head.weight)
        weight, cast = head_weight(self._head, dtype)
        result, self.extras = self.consume(hidden, OutputHead(weight, self.softcap, dtype, cast))
        self.returned = result is not None
        return hidden.new_zeros(*hidden.shape[:-1], 0) if result is None else result


def forward_with_head(model: nn.Module, consume: Callable, **inputs):
    """``model(**inputs)`` with the head replaced by ``consume(hidden [B, T, H], head) -> (tensor or None, extras)``
    inside the forward; returns (that tensor as the model returned it, or None; extras)."""
    inner = _inner(model)
    head = inner.lm_head
    softcap = getattr(inner.config, "final_logit_softcapping", None)  # absent where the forward applies none
    tap = _HeadTap(head, consume, softcap)
    inner.lm_head = tap
    if softcap is not None:
        inner.config.final_logit_softcapping = None  # OutputHead applies it per chunk
    try:
        out = model(**inputs)
    finally:
        inner.lm_head = head
        if softcap is not None:
            inner.config.final_logit_softcapping = softcap
    return (out.logits if tap.returned else None), tap.extras


GRAD_BUFFER_ELEMENTS = 1 << 27  # logit gradients kept for one weight-gradient matmul (256 MiB in bf16)
WIDEN_ROWS = 8192  # rows of the weight gradient widened to fp32 at a time


class _FusedHeadLoss(torch.autograd.Function):
    """sum over chunks of ``chunk_loss(logits of rows s:e, s, e)``; gradients computed in the forward pass.

    The weight gradient ``g^T h`` accumulates in fp32. In fp32 each chunk adds into it in place (``addmm_``); in a
    lower compute dtype (bf16 autocast) the chunks' logit gradients are buffered (``GRAD_BUFFER_ELEMENTS``) and go
    into one matmul per buffer, whose result is added once: a short-K bf16 matmul per chunk, and an fp32 pass over
    the ``[vocab, hidden]`` gradient per chunk, would cost more than the fp32 matmul they replace."""

    @staticmethod
    def forward(ctx, hidden, weight, head: OutputHead, chunk_loss: Callable, rows: int):
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        need_weight = ctx.needs_input_grad[1]
        # fp32 accumulation whatever the weight's dtype (FSDP's bf16 gathered weight included); cast at the end
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        buffered = need_weight and head.dtype != accumulate
        grad_weight = None
        if need_weight:  # buffered: written by the first flush (no zero fill of [vocab, hidden] first)
            grad_weight = torch.empty_like(weight, dtype=accumulate) if buffered else \
                torch.zeros_like(weight, dtype=accumulate)
        if buffered:  # logit gradients of consecutive rows, from row ``first`` on
            gbuf = torch.empty(min(n, max(rows, GRAD_BUFFER_ELEMENTS // head.vocab)), head.vocab, dtype=head.dtype,
                               device=hidden.device)
            first, filled = 0, 0

        def flush():
            nonlocal first, filled
            if filled:
                part = gbuf[:filled].t() @ hidden[first:first + filled].to(head.dtype)
                # into the fp32 buffer row block by row block: a widening copy of the whole [vocab, hidden] part
                # would allocate (and fault in) an fp32 temporary of that size
                for r in range(0, part.shape[0], WIDEN_ROWS):
                    if first == 0:
                        grad_weight[r:r + WIDEN_ROWS].copy_(part[r:r + WIDEN_ROWS])
                    else:
                        grad_weight[r:r + WIDEN_ROWS].add_(part[r:r + WIDEN_ROWS])
                first, filled = first + filled, 0

        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                e = min(s + rows, n)
                h = hidden[s:e].to(head.dtype)
                raw = head.matmul(h).requires_grad_()
                with torch.enable_grad():
                    loss = chunk_loss(head.cap(raw), s, e)
                (g,) = torch.autograd.grad(loss, raw)
                total += loss.detach()
                del raw, loss
                grad_hidden[s:e] = (g @ head.cast).to(hidden.dtype)
                if buffered:
                    if filled + (e - s) > gbuf.shape[0]:
                        flush()
                    gbuf[filled:filled + e - s] = g
                    filled += e - s
                elif need_weight:
                    grad_weight.addmm_(g.t(), h)  # in place: no [vocab, hidden] temporary
            if buffered:
                flush()
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.grad_hidden, ctx.grad_weight
        if gh is None:
            raise RuntimeError("the fused head loss can be backpropagated once (no retain_graph)")
        ctx.grad_hidden = ctx.grad_weight = None  # the engine holds the only reference: AccumulateGrad may keep it
        if float(grad_out) != 1.0:
            gh.mul_(grad_out)
            if gw is not None:
                gw.mul_(grad_out)
        return gh, gw, None, None, None


def fused_head_loss(hidden: torch.Tensor, head: OutputHead, chunk_loss: Callable, rows: int | None = None):
    """``sum_chunks chunk_loss(head.logits(hidden[s:e]), s, e)`` for hidden rows ``[N, H]``, chunked (see the
    module docstring). ``chunk_loss`` returns a scalar; it may record detached parts on the side."""
    rows = rows or chunk_rows(head.vocab)
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return _FusedHeadLoss.apply(hidden, head.weight, head, chunk_loss, rows)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], rows):
        e = min(s + rows, hidden.shape[0])
        total += chunk_loss(head.logits(hidden[s:e]), s, e).detach()
    return total
