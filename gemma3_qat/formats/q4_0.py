"""llama.cpp's Q4_0 rule (``quantize_row_q4_0_ref``), as pure functions over ``[..., group]`` fp32 blocks.

Scale from the SIGNED extreme ``d = m / -8``; codes from the unrounded fp32 reciprocal
``q = min(15, trunc(x * (1/d) + 8.5))``; stored scale ``fp16(d)``. int4-block applies it to blocks of 32 weights of
a row, int4-channel to the whole row.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemma3_qat.formats.base import FP16_MAX, FormatError

Q4_0_BLOCK, Q4_0_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]  # 32 weights: fp16 scale + 16 bytes


def signed_extreme(blocks: torch.Tensor) -> torch.Tensor:
    """``x[i]`` for the FIRST ``i`` with the largest ``|x|`` of each block (ggml keeps the first it meets)."""
    hi = blocks.amax(dim=-1, keepdim=True)
    lo = blocks.amin(dim=-1, keepdim=True)
    m = torch.where(hi > -lo, hi, lo)
    tie = (hi == -lo).squeeze(-1)  # +a and -a both present, or an all-zero block: the first occurrence decides
    if tie.any():
        tied = blocks[tie]
        m[tie] = torch.gather(tied, -1, tied.abs().argmax(dim=-1, keepdim=True))  # argmax: first occurrence
    return m


def extreme_position(blocks: torch.Tensor, extreme: torch.Tensor) -> torch.Tensor:
    """Index ``[..., 1]`` of the first element equal to its block's signed extreme: the one the rule read."""
    return (blocks == extreme).to(torch.uint8).argmax(dim=-1, keepdim=True)


def q4_0_scale(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's scale of each block (last axis): (reciprocal of the unrounded fp32 ``d``, stored ``fp16(d)``)."""
    return q4_0_extreme_and_scale(blocks)[1:]


def q4_0_extreme_and_scale(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, 1/d, fp16(d))`` of each block: its signed extreme ``m`` (which sets ``d = m / -8``) and the scale."""
    m = signed_extreme(blocks)
    d = m / -8.0
    scale = d.to(torch.float16)
    # ggml: id = d ? 1/d : 0. Where fp16(d) is zero the stored block is zero whatever the codes: inv = 0 gives the
    # canonical codes 8 (what re-quantizing those zeros gives) and avoids 1/d = inf for fp32-subnormal d.
    inv = torch.where(scale == 0, torch.zeros_like(d), 1.0 / d)
    if torch.isinf(scale).any():
        worst = float(torch.max(blocks.amax(), -blocks.amin()))
        raise FormatError(
            f"weight magnitude {worst:.6g} is too large for an fp16 int4 scale (|w| must stay below "
            f"{8 * FP16_MAX:.0f}); rescale the weight or keep this tensor unquantized"
        )
    return m, inv, scale


def q4_0_q(blocks: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Q4_0's codes ``q = min(15, trunc(x * inv + 8.5))`` as fp32 in [0, 15], in one fresh buffer.

    The multiply and the add are separate operations (eager torch never fuses them into an FMA). The chain works
    in place: on CPU a fresh full-size buffer costs more than an elementwise pass.
    """
    return torch.mul(blocks, inv).add_(8.5).trunc_().clamp_(0, 15)


BOUNDARY_TOLERANCE = 1e-4  # of a step: a continuous weight lies this close to a rounding boundary 0.02% of the time


def q4_0_off_boundaries(blocks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``blocks`` with each weight that lies on a rounding boundary of the rule (``x * (1/d) + 8.5`` within
    ``BOUNDARY_TOLERANCE`` of an integer) moved a quarter step into the code it quantizes to; and how many moved.

    Codes and scales are unchanged (the moved weight stays inside its code's interval, and never reaches the
    block's extreme, so ``d`` is the same): the quantized model is the same, but its latent weights no longer sit
    where the smallest update flips a code. A model dequantized from a finer lattice sits there: Q5_0 values
    ``k * d5`` under Q4_0's ``d = 2 * d5`` are ties for every odd ``k``, about half the weights, and one optimizer
    step would flip them all in the gradient's direction, a full step each."""
    _, inv, _ = q4_0_extreme_and_scale(blocks)
    t = blocks * inv + 8.5
    frac = t - t.floor()
    up = frac < BOUNDARY_TOLERANCE  # on the boundary or just above it: the code of the interval above
    down = frac > 1 - BOUNDARY_TOLERANCE
    clamped = (t >= 15.5) | (t < 0.5)  # the codes past 15 or below 0 clamp: no boundary there
    up &= ~clamped
    down &= ~clamped
    safe_inv = torch.where(inv == 0, torch.ones_like(inv), inv)
    moved = blocks + (up.float() * 0.25 - down.float() * 0.25) / safe_inv
    moved = torch.where(inv == 0, blocks, moved)
    return moved, int((up | down).logical_and(inv != 0).sum())


def int4_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantize codes ``q`` in [0, 15] with fp16 scales broadcast over the last axis: ``(q - 8) * D`` in fp32."""
    return (q.to(torch.float32) - 8.0) * scale.to(torch.float32)



def pack_q4_0(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """The GGUF/ggml Q4_0 bytes of codes ``[out, in]`` (uint8 in [0, 15]) and fp16 scales ``[out, in // 32]`` (or
    ``[out, 1]``, repeated in every block of its row): uint8 ``[out, in // 32 * 18]``.

    Per block: the fp16 scale (little-endian), then 16 bytes, byte ``j`` = element ``j`` (low nibble) and element
    ``j + 16`` (high nibble).
    """
    out, n = codes.shape
    if n % Q4_0_BLOCK:
        raise FormatError(f"Q4_0 needs rows that are a multiple of {Q4_0_BLOCK}, got shape {(out, n)}")
    nb = n // Q4_0_BLOCK
    q = codes.reshape(out, nb, 2, Q4_0_BLOCK // 2).cpu().numpy()
    nibbles = q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))
    scales = scales.to(torch.float16).expand(out, nb).cpu().contiguous().numpy()
    scale_bytes = scales.reshape(out, nb, 1).view(np.uint8)  # little-endian on every platform torch runs on
    return np.concatenate([scale_bytes, nibbles], axis=-1).reshape(out, nb * Q4_0_BLOCK_BYTES)


def q4_0_bytes_of(values: torch.Tensor) -> np.ndarray:
    """fp32 ``[rows, n]`` quantized by Q4_0's rule into its bytes (what ``llama-quantize Q4_0`` writes)."""
    blocks = values.reshape(values.shape[0], -1, Q4_0_BLOCK)
    inv, scale = q4_0_scale(blocks)
    return pack_q4_0(q4_0_q(blocks, inv).to(torch.uint8).reshape(values.shape), scale.squeeze(-1))
