"""ggml's stored forms of Q4_K, Q6_K, Q5_0 and Q8_0 (what ``kquants``' quantizers return) and their GGUF bytes.

``pack_X`` writes ggml's ``block_X`` layout of a stored form (numpy uint8, one row of blocks per weight row);
``unpack_X`` reads it back. ``kquants`` re-exports every name here: import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemma3_qat.formats.base import FormatError

QK_K = 256
Q4_K_BLOCK, Q4_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]  # 256, 144
Q6_K_BLOCK, Q6_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]  # 256, 210
Q5_0_BLOCK, Q5_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0]  # 32, 22
Q8_0_BLOCK, Q8_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]  # 32, 34


@dataclass(frozen=True)
class KQuantized:
    """A weight quantized to one of these ggml types, as ggml stores it (tensors on the weight's device).

    ``codes``: the per-weight integer codes, ``[rows, n]``; ``d``: the fp16 scale per block, ``[rows, n // block]``.
    """

    codes: torch.Tensor
    d: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


@dataclass(frozen=True)
class Q4KQuantized(KQuantized):
    """Q4_K: ``codes`` uint8 0..15; ``d``, ``dmin`` fp16 ``[rows, n // 256]``; ``scales``, ``mins`` uint8 0..63
    ``[rows, n // 256, 8]`` (sub-block ``j`` = weights ``32 j .. 32 j + 31`` of its super-block)."""

    dmin: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor


@dataclass(frozen=True)
class Q6KQuantized(KQuantized):
    """Q6_K: ``codes`` uint8 0..63 (value ``u - 32``); ``d`` fp16 ``[rows, n // 256]``; ``scales`` int8
    ``[rows, n // 256, 16]`` (sub-block ``j`` = weights ``16 j .. 16 j + 15``)."""

    scales: torch.Tensor


@dataclass(frozen=True)
class Q50Quantized(KQuantized):
    """Q5_0: ``codes`` uint8 0..31 (value ``u - 16``); ``d`` fp16 ``[rows, n // 32]`` (may be negative)."""


@dataclass(frozen=True)
class Q80Quantized(KQuantized):
    """Q8_0: ``codes`` int8; ``d`` fp16 ``[rows, n // 32]``."""


def pack_q4_k(q: Q4KQuantized) -> np.ndarray:
    """The ggml ``block_q4_K`` bytes, uint8 ``[rows, n // 256 * 144]``: d, dmin (fp16 LE), scales[12], qs[128]."""
    rows, n = q.codes.shape
    nsb = n // 256
    sc = q.scales.cpu().numpy().astype(np.uint8)
    m = q.mins.cpu().numpy().astype(np.uint8)
    s = np.empty((rows, nsb, 12), np.uint8)
    s[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    s[..., 4:8] = m[..., 0:4] | ((m[..., 4:8] >> 4) << 6)
    s[..., 8:12] = (sc[..., 4:8] & 15) | ((m[..., 4:8] & 15) << 4)
    u = q.codes.cpu().numpy().astype(np.uint8).reshape(rows, nsb, 4, 2, 32)
    qs = (u[:, :, :, 0, :] | (u[:, :, :, 1, :] << 4)).reshape(rows, nsb, 128)
    d = q.d.cpu().contiguous().numpy().astype("<f2").view(np.uint8).reshape(rows, nsb, 2)
    dm = q.dmin.cpu().contiguous().numpy().astype("<f2").view(np.uint8).reshape(rows, nsb, 2)
    return np.concatenate([d, dm, s, qs], axis=-1).reshape(rows, nsb * Q4_K_BYTES)


def _blocks_of(data: np.ndarray | bytes, n: int, block: int, nbytes: int, name: str) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
    if n % block or raw.dtype != np.uint8 or raw.size % (n // block * nbytes):
        raise FormatError(f"{name}: {raw.size} bytes ({raw.dtype}) are not whole rows of {n} weights")
    return raw.reshape(-1, n // block, nbytes)


def unpack_q4_k(data: np.ndarray | bytes, n: int) -> Q4KQuantized:
    """Read ``pack_q4_k``'s bytes (rows of ``n`` weights) back; tensors on the CPU."""
    blk = _blocks_of(data, n, Q4_K_BLOCK, Q4_K_BYTES, "Q4_K")
    rows, nsb = blk.shape[:2]
    d = blk[..., 0:2].copy().view("<f2").astype(np.float16).reshape(rows, nsb)
    dm = blk[..., 2:4].copy().view("<f2").astype(np.float16).reshape(rows, nsb)
    s = blk[..., 4:16]
    sc = np.empty((rows, nsb, 8), np.uint8)
    m = np.empty_like(sc)
    sc[..., 0:4] = s[..., 0:4] & 63
    m[..., 0:4] = s[..., 4:8] & 63
    sc[..., 4:8] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:8] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = blk[..., 16:144].reshape(rows, nsb, 4, 1, 32)
    u = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(rows, n)
    return Q4KQuantized(codes=torch.from_numpy(u.copy()), d=torch.from_numpy(d), dmin=torch.from_numpy(dm),
                        scales=torch.from_numpy(sc), mins=torch.from_numpy(m))


def pack_q6_k(q: Q6KQuantized) -> np.ndarray:
    """The ggml ``block_q6_K`` bytes, uint8 ``[rows, n // 256 * 210]``: ql[128], qh[64], scales int8[16], d."""
    rows, n = q.codes.shape
    nsb = n // 256
    u = q.codes.cpu().numpy().astype(np.uint8).reshape(rows, nsb, 2, 4, 32)  # [.., half, quarter, l]
    lo = u & 15
    ql = np.concatenate([lo[:, :, :, 0] | (lo[:, :, :, 2] << 4), lo[:, :, :, 1] | (lo[:, :, :, 3] << 4)], axis=-1)
    hb = u >> 4
    qh = hb[:, :, :, 0] | (hb[:, :, :, 1] << 2) | (hb[:, :, :, 2] << 4) | (hb[:, :, :, 3] << 6)
    sc = q.scales.cpu().numpy().astype(np.int8).view(np.uint8).reshape(rows, nsb, 16)
    d = q.d.cpu().contiguous().numpy().astype("<f2").view(np.uint8).reshape(rows, nsb, 2)
    return np.concatenate([ql.reshape(rows, nsb, 128), qh.reshape(rows, nsb, 64), sc, d],
                          axis=-1).reshape(rows, nsb * Q6_K_BYTES)


def unpack_q6_k(data: np.ndarray | bytes, n: int) -> Q6KQuantized:
    """Read ``pack_q6_k``'s bytes (rows of ``n`` weights) back; tensors on the CPU."""
    blk = _blocks_of(data, n, Q6_K_BLOCK, Q6_K_BYTES, "Q6_K")
    rows, nsb = blk.shape[:2]
    ql = blk[..., 0:128].reshape(rows, nsb, 2, 2, 32)  # [.., half, which of the two 32-byte runs, l]
    qh = blk[..., 128:192].reshape(rows, nsb, 2, 1, 32)
    low = np.stack([ql[:, :, :, 0] & 15, ql[:, :, :, 1] & 15, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4], axis=3)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 1, 4, 1)) & 3
    u = (low | (high << 4)).reshape(rows, n)
    sc = blk[..., 192:208].copy().view(np.int8)
    d = blk[..., 208:210].copy().view("<f2").astype(np.float16).reshape(rows, nsb)
    return Q6KQuantized(codes=torch.from_numpy(u.copy()), d=torch.from_numpy(d), scales=torch.from_numpy(sc))


def pack_q5_0(q: Q50Quantized) -> np.ndarray:
    """The ggml ``block_q5_0`` bytes, uint8 ``[rows, n // 32 * 22]``: d (fp16), qh (uint32 LE), qs[16]."""
    rows, n = q.codes.shape
    nb = n // 32
    u = q.codes.cpu().numpy().astype(np.uint8).reshape(rows, nb, 32)
    qs = (u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)
    bits = ((u >> 4) & 1).astype("<u4") << np.arange(32, dtype="<u4")
    qh = np.bitwise_or.reduce(bits, axis=-1).astype("<u4").view(np.uint8).reshape(rows, nb, 4)
    d = q.d.cpu().contiguous().numpy().astype("<f2").view(np.uint8).reshape(rows, nb, 2)
    return np.concatenate([d, qh, qs], axis=-1).reshape(rows, nb * Q5_0_BYTES)


def unpack_q5_0(data: np.ndarray | bytes, n: int) -> Q50Quantized:
    """Read ``pack_q5_0``'s bytes (rows of ``n`` weights) back; tensors on the CPU."""
    blk = _blocks_of(data, n, Q5_0_BLOCK, Q5_0_BYTES, "Q5_0")
    rows, nb = blk.shape[:2]
    d = blk[..., 0:2].copy().view("<f2").astype(np.float16).reshape(rows, nb)
    qh = blk[..., 2:6].copy().view("<u4").reshape(rows, nb, 1)
    high = ((qh >> np.arange(32, dtype="<u4")) & 1).astype(np.uint8)
    qs = blk[..., 6:22]
    u = (np.concatenate([qs & 15, qs >> 4], axis=-1) | (high << 4)).reshape(rows, n)
    return Q50Quantized(codes=torch.from_numpy(u.copy()), d=torch.from_numpy(d))


def pack_q8_0(q: Q80Quantized) -> np.ndarray:
    """The ggml ``block_q8_0`` bytes, uint8 ``[rows, n // 32 * 34]``: d (fp16), qs int8[32]."""
    rows, n = q.codes.shape
    nb = n // 32
    qs = q.codes.cpu().numpy().astype(np.int8).view(np.uint8).reshape(rows, nb, 32)
    d = q.d.cpu().contiguous().numpy().astype("<f2").view(np.uint8).reshape(rows, nb, 2)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * Q8_0_BYTES)


def unpack_q8_0(data: np.ndarray | bytes, n: int) -> Q80Quantized:
    """Read ``pack_q8_0``'s bytes (rows of ``n`` weights) back; tensors on the CPU."""
    blk = _blocks_of(data, n, Q8_0_BLOCK, Q8_0_BYTES, "Q8_0")
    rows, nb = blk.shape[:2]
    d = blk[..., 0:2].copy().view("<f2").astype(np.float16).reshape(rows, nb)
    qs = blk[..., 2:34].copy().view(np.int8).reshape(rows, n)
    return Q80Quantized(codes=torch.from_numpy(qs), d=torch.from_numpy(d))
