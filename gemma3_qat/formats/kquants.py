"""llama.cpp's Q4_K, Q6_K, Q5_0 and Q8_0 weight lattices, bit for bit, as vectorised PyTorch (spec:
``docs/specs/kquants.md``).

What each lattice is, in our words (a row is cut into blocks along the input features; blocks never straddle rows):

* **Q4_K** (144 bytes per 256 weights). A super-block of 256 is 8 sub-blocks of 32. Each sub-block is an affine
  4-bit grid ``value = (d * sc) * u - dmin * m`` with ``u`` in 0..15 and a 6-bit scale ``sc`` and 6-bit min ``m``;
  ``d`` and ``dmin`` are fp16, one pair per super-block. ggml finds each sub-block's (scale, min) by a weighted
  least-squares search over 21 candidate grids (weights ``sqrt(mean x^2) + |x|``); each candidate is fitted
  against the offset of the best candidate so far. The 8 scales and 8 mins are then rounded to 6 bits against
  their largest, and the codes are recomputed by division with the fp16-rounded super-scales.
* **Q6_K** (210 bytes per 256). 16 sub-blocks of 16, symmetric 6-bit: ``value = (d * sc) * (u - 32)``, ``u`` in
  0..63, one signed int8 scale ``sc`` per sub-block and one fp16 ``d``. Each sub-block's scale comes from an
  18-candidate search that maximises the ``(sum w x l)^2 / sum w l^2`` fit with weights ``x^2``; the sub-block
  extreme lands on ``-32``, and the largest scale on ``sc = -128``.
* **Q5_0** (22 bytes per 32). ``value = (u - 16) * d``, ``d = m / -16`` from the SIGNED extreme ``m`` (the first
  largest ``|x|``), codes ``min(31, trunc(x * (1/d) + 16.5))`` from the unrounded fp32 ``d``; ``d`` stored fp16.
* **Q8_0** (34 bytes per 32). ``value = q * d``, ``d = max|x| / 127``, ``q = roundf(x * (1/d))`` (half away from
  zero) in int8; ``d`` stored fp16.

For each type X: ``quantize_X`` (fp32 ``[rows, n]`` -> the codes and scales as ggml stores them), ``dequantize_X``
(ggml's ``dequantize_row_*``), ``fake_quantize_X`` (the two composed, in one pass), ``pack_X`` / ``unpack_X``
(the GGUF bytes, numpy; defined with the stored forms in ``kquant_blocks``).

How the numerics stay bit-exact (``docs/specs/kquants.md`` §0, §3.7, §3.8):

* Every fp32 operation of the C reference is one separate eager torch operation (no fused ops, no
  ``torch.compile``), in the C order. Reductions over a block's elements run left to right from position 0, so
  each block's sums are the same fp32 chain as in C: blocks are laid out position-major (``[positions, blocks]``)
  and the chain is one ``index_add_`` on CPU (its kernel adds the slices in index order) or a Python loop of
  adds on CUDA.
* ``sqrtf`` goes through fp64 (``torch.sqrt`` on fp32 CPU tensors is not correctly rounded).
* Integer codes held in fp32 are kept at +0 (``round(-0.3)`` is -0.0; C's integer 0 dequantizes to +0).
* The candidate searches are Python loops over the candidates with masked per-block updates.
* Divisions are tensor / tensor. (``c / t`` in torch is ``reciprocal(t) * c``, and CUDA divides by a Python scalar
  with a reciprocal multiply: both round twice.)
* ggml's ``nearest_int`` is round-half-even (``torch.round``) for ``|v| <= 4194303``. Beyond that, and for NaN or
  inf (degenerate grids of the Q4_K search), its magic-number bit trick returns other integers; the rounding
  helper checks each block's extreme values and then reproduces the bit trick exactly (x86 NaN -> 0).
* ``x * (1/d)`` that is not finite (fp32-subnormal ``d``) gives code 0 in the x86 C build (Q5_0, Q8_0).

Inputs must be finite; a scale that overflows fp16 raises ``FormatError`` (ggml would store inf).
"""

from __future__ import annotations

import numpy as np
import torch

from gemma3_qat.formats.base import FormatError, as_fp32_matrix
# the stored forms and their bytes (pack_*, unpack_*) live in kquant_blocks; they are this module's API too
from gemma3_qat.formats.kquant_blocks import (  # noqa: F401
    Q4_K_BLOCK, Q4_K_BYTES, Q5_0_BLOCK, Q5_0_BYTES, Q6_K_BLOCK, Q6_K_BYTES, Q8_0_BLOCK, Q8_0_BYTES, QK_K, KQuantized,
    Q4KQuantized, Q6KQuantized, Q50Quantized, Q80Quantized, pack_q4_k, pack_q5_0, pack_q6_k, pack_q8_0, unpack_q4_k,
    unpack_q5_0, unpack_q6_k, unpack_q8_0)

_NI_LIMIT = 4194303.0  # |v| up to which ggml's nearest_int equals round-half-even
_MAGIC = 12582912.0  # 1.5 * 2**23, nearest_int's magic number
_GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml's GROUP_MAX_EPS (1e-15f)
_ROUNDF_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))  # 0.49999997f, see _roundf

# Candidate numerators, evaluated in fp32 as the C source does.
# Q4_K (make_qkx2_quants, rmin -1, rdelta 0.1, nstep 20, nmax 15): (rmin + rdelta * is) + nmax, is = 0..20.
_Q4K_CANDIDATES = [float((np.float32(-1.0) + np.float32(0.1) * np.float32(s)) + np.float32(15)) for s in range(21)]
# Q6_K (make_qx_quants, nmax 32): -(nmax + 0.1f * is), is = -9..-1, 1..9.
_Q6K_CANDIDATES = [float(-(np.float32(32) + np.float32(0.1) * np.float32(s))) for s in range(-9, 10) if s]

# Elements per chunk: bounds the working set (cache on CPU, memory on CUDA). A multiple of 256.
_CPU_CHUNK = 1 << 18
_CUDA_CHUNK = 1 << 24


# ---------------------------------------------------------------------------------------------------- primitives


def _checked(weight: torch.Tensor, block: int, name: str) -> torch.Tensor:
    x = as_fp32_matrix(weight)
    if x.shape[1] % block:
        raise FormatError(f"{name} needs rows that are a multiple of {block} weights, got shape {tuple(x.shape)}")
    return x


def _require_finite(extremes: torch.Tensor, name: str) -> None:
    """``extremes``: per-block max/min (or max |x|) of the weights, which propagate NaN and inf."""
    if not bool(torch.isfinite(extremes).all()):
        raise FormatError(f"{name} cannot quantize a weight with NaN or inf values")


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim fp32 tensor on ``like``'s device (so that a division by or of it is a true division)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _rdiv(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """``f32(numerator / t)``, one correctly rounded division."""
    return torch.div(_const(numerator, t), t)


_ZERO_INDEX: dict[tuple[int, str], torch.Tensor] = {}


def _seq_sum(terms: torch.Tensor, *, from_zero: bool = True) -> torch.Tensor:
    """Sum ``terms`` ``[P, ...]`` over P left to right in fp32: ``((0 + t0) + t1) + ...`` (C's ``s = 0; s += t``), or
    ``(t0 + t1) + ...`` with ``from_zero=False``.

    On CPU this is one ``index_add_`` into a single row: its CPU kernel adds the source slices one after another in
    index order, each an exact fp32 ``a + 1 * b`` (``tests/test_kquants.py`` checks it bit for bit against the
    Python loop). CUDA's ``index_add_`` uses atomics (any order), so there it is a Python loop."""
    rows = terms.shape[0]
    if terms.device.type == "cpu":
        start = 0 if from_zero else 1
        key = (rows - start, str(terms.device))
        if key not in _ZERO_INDEX:
            _ZERO_INDEX[key] = torch.zeros(rows - start, dtype=torch.long, device=terms.device)
        acc = terms.new_zeros((1,) + terms.shape[1:]) if from_zero else terms[:1].clone()
        acc.index_add_(0, _ZERO_INDEX[key], terms[start:])
        return acc[0]
    parts = terms.unbind(0)
    acc = parts[0] + 0.0 if from_zero else parts[0].clone()
    for t in parts[1:]:
        acc += t
    return acc


def _seq_sum_loop(terms: torch.Tensor, *, from_zero: bool = True) -> torch.Tensor:
    """``_seq_sum`` as a plain Python loop of adds (the definition; the tests compare the two)."""
    parts = terms.unbind(0)
    acc = parts[0] + 0.0 if from_zero else parts[0].clone()
    for t in parts[1:]:
        acc = acc + t
    return acc


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 ``sqrtf``: through fp64, whose rounding to fp32 is then exact (53 >= 2 * 24 + 2 bits).
    ``torch.sqrt`` on fp32 CPU tensors is not correctly rounded (its AVX-512 path is off by one ulp for about 20%
    of inputs)."""
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def _first_extreme(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, m)`` per column of ``x`` ``[P, B]``: C's ``if (|x_i| > amax) { amax = |x_i|; m = x_i; }`` from
    ``amax = m = 0``: the signed value at the FIRST largest ``|x|``, +0 for an all-zero column."""
    a = x.abs()
    amax = a[0] + 0.0  # 0 < |x_0|? |x_0| : 0, as +0 for a zero
    m = torch.where(a[0] > 0, x[0], torch.zeros_like(amax))
    for i in range(1, x.shape[0]):
        upd = a[i] > amax
        amax = torch.where(upd, a[i], amax)
        m = torch.where(upd, x[i], m)
    return amax, m


def _first_extreme_last(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``_first_extreme`` over the last axis of ``x`` ``[..., P]``, vectorised (ties: first occurrence)."""
    a = x.abs()
    amax = a.amax(dim=-1, keepdim=True)
    first = (a == amax).to(torch.uint8).argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    m = torch.gather(x, -1, first)
    m = torch.where(amax > 0, m, torch.zeros_like(m))
    return amax.squeeze(-1), m.squeeze(-1)


def _nearest_int_exact(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int(v)`` for every fp32 ``v`` (x86: NaN -> 0, +-inf -> -4194304), as fp32."""
    t = torch.where(torch.isnan(v), torch.zeros_like(v), v) + _MAGIC
    return ((t.view(torch.int32) & 0x7FFFFF) - 0x400000).to(torch.float32)


def _in_ni_range(*ends: torch.Tensor) -> bool:
    """Whether every value is within ``nearest_int``'s exact range (NaN is not)."""
    return all(bool(torch.abs(e).max() <= _NI_LIMIT) for e in ends)  # max propagates NaN


def _rni_(v: torch.Tensor, *ends: torch.Tensor) -> torch.Tensor:
    """``nearest_int`` of ``v``, in place where possible. ``ends``: tensors holding the extreme ``v`` of each block
    (the computations are monotone in ``x``), which decide whether round-half-even is exact. (For the Q4_K search
    the lower end is enough: when it is finite, so is ``iscale``, and the upper end is about the candidate's
    ``nmax + rmin + rdelta * is``.)"""
    if _in_ni_range(*ends):
        return v.round_()
    return _nearest_int_exact(v)


def _chunks(total: int, unit: int, device: torch.device):
    """Ranges ``[a, b)`` over ``total`` units of ``unit`` elements, about ``_CHUNK`` elements each."""
    per = max(1, (_CUDA_CHUNK if device.type == "cuda" else _CPU_CHUNK) // unit)
    for a in range(0, total, per):
        yield a, min(total, a + per)


def _fp16(v: torch.Tensor, what: str, x: torch.Tensor) -> torch.Tensor:
    """``GGML_FP32_TO_FP16(v)`` (round to nearest even, subnormals included); ``FormatError`` where it is not finite
    (the weights ``x`` are too large for the lattice: ggml would store inf or NaN)."""
    h = v.to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        worst = float(x.abs().max())
        raise FormatError(f"weights too large: the {what} overflows fp16 (largest |weight| {worst:.6g}); rescale "
                          f"the weight or keep this tensor unquantized")
    return h


# ----------------------------------------------------------------------------------------------------------- Q4_K


def _q4k_search(lx: torch.Tensor, track_codes: bool):
    """``make_qkx2_quants(32, 15, x, w, ..., -1, 0.1, 20, false)`` per column of ``x = lx[:, 1]`` (``lx``
    ``[32, 2, B]``; ``lx[:, 0]`` is scratch), with Q4_K's weights. Returns ``(scale, mn, inv, off, ends)``:
    ``scale``, ``mn`` ``[B]``; ``ends`` ``[2, B]`` = each column's smallest and largest x; with ``track_codes``,
    the codes the search kept are ``clamp(nearest_int(inv * (x - off)), 0, 15)`` (0 for a flat sub-block),
    otherwise ``inv`` and ``off`` are None."""
    npos, _, nb = lx.shape
    buf_v, x = lx.unbind(1)  # [la, x]: one multiply makes both w l l and w l x
    # weights: av = sqrtf((0 + x0^2 + ...) / 32), w = av + |x|; sw = w0 + w1 + ..., sx = w0 x0 + w1 x1 + ...
    sq = x * x
    av = _sqrt(torch.div(_seq_sum(sq), _const(32.0, x)))
    pair = torch.empty((npos, 2, nb), dtype=x.dtype, device=x.device)
    w = torch.abs(x, out=pair[:, 0]).add_(av)
    torch.mul(w, x, out=pair[:, 1])
    sw, sx = _seq_sum(pair, from_zero=False).unbind(0)
    ends = torch.stack([x.amin(dim=0), x.amax(dim=0)])  # [2, B]: v = iscale * (x - lo) is monotone in x
    _require_finite(ends, "Q4_K")
    xmin, hi = ends.unbind(0)
    lo = torch.where(xmin > 0, torch.zeros_like(xmin), xmin)
    flat = hi == lo  # all-zero, or all equal and <= 0: L = 0, scale 0, mn = -lo
    active = ~flat
    # flat columns never take a candidate; any finite non-zero hi - lo keeps their arithmetic harmless
    hi_f = torch.where(flat, torch.abs(lo).mul_(2.0).add_(1.0), hi)

    # the initial grid: iscale = 15 / (hi - lo), scale = 1 / iscale
    inv = _rdiv(15.0, hi_f - lo)
    scale = _rdiv(1.0, inv)
    la = _rni_(torch.sub(x, lo, out=buf_v).mul_(inv), inv * (xmin - lo)).clamp_(0, 15)
    buf_e = torch.mul(la, scale, out=sq).add_(lo).sub_(x)
    best = _seq_sum(buf_e.mul_(buf_e).mul_(w))
    off = lo.clone() if track_codes else None

    prods = pair.new_empty((npos, 3, nb))  # w l, w l l, w l x: three sums in one chain of adds
    wl = prods[:, 0]
    # the state [best, scale, cur] and each candidate's [err, a, b], so that one where() updates all three;
    # cur is the current best offset ("min" in C): each candidate is fitted against it
    state = torch.stack([best, scale, lo])
    new = torch.empty_like(state)
    err, a, b = new.unbind(0)
    consts = [_const(c, x) for c in _Q4K_CANDIDATES]
    for c in consts:
        cur = state[2]
        isc = torch.div(c, hi_f - cur)
        v = torch.sub(x, cur, out=buf_v).mul_(isc)
        la = _rni_(v, isc * (xmin - cur))
        if la is not buf_v:
            buf_v.copy_(la)
            la = buf_v
        la.clamp_(0, 15)
        torch.mul(w, la, out=wl)
        torch.mul(wl.unsqueeze(1), lx, out=prods[:, 1:])
        sl, sl2, sxl = _seq_sum(prods).unbind(0)
        dd = sw * sl2 - sl * sl
        torch.div(sw * sxl - sx * sl, dd, out=a)
        torch.div(sl2 * sx - sl * sxl, dd, out=b)
        pos = b > 0
        torch.where(pos, torch.div(sxl, sl2), a, out=a)
        b.masked_fill_(pos, 0.0)
        e = torch.mul(la, a, out=buf_e).add_(b).sub_(x)
        err.copy_(_seq_sum(e.mul_(e).mul_(w)))
        win = (dd > 0).logical_and_(err < state[0]).logical_and_(active)
        if track_codes:
            inv = torch.where(win, isc, inv)
            off = torch.where(win, cur, off)
        state = torch.where(win, new, state)
    best, scale, cur = state.unbind(0)
    scale = scale.masked_fill(flat, 0.0)
    mn = torch.neg(torch.where(flat, lo, cur))
    if track_codes:
        inv = inv.masked_fill_(flat, 0.0)
        off = off.masked_fill_(flat, 0.0)
    return scale, mn, inv, off, ends


def _q4k_super(scale: torch.Tensor, mn: torch.Tensor, x: torch.Tensor):
    """Per super-block (``[S, 8]`` sub-block scales and mins): the 6-bit ``sc``, ``m`` (fp32 integers) and fp16
    ``d``, ``dmin`` (``[S]``), as ``quantize_row_q4_K_ref``."""
    zero = torch.zeros((), dtype=torch.float32, device=scale.device)
    smax = scale.amax(dim=-1)
    smax = torch.where(smax > 0, smax, zero)  # running max from +0 with strict >
    mmax = mn.amax(dim=-1)
    mmax = torch.where(mmax > 0, mmax, zero)
    one = torch.ones_like(smax)
    i_s = torch.where(smax > 0, _rdiv(63.0, torch.where(smax > 0, smax, one)), zero)
    i_m = torch.where(mmax > 0, _rdiv(63.0, torch.where(mmax > 0, mmax, one)), zero)

    def six_bits(iv, vals):  # min(63, (uint8_t) nearest_int(iv * v))
        p = iv.unsqueeze(-1) * vals
        r = p.round() if _in_ni_range(p) else _nearest_int_exact(p)
        r = r.to(torch.int32) & 0xFF  # the C conversion to uint8_t wraps
        return r.clamp_(max=63).to(torch.float32)

    sc = six_bits(i_s, scale)
    m = six_bits(i_m, mn)
    d = _fp16(torch.div(smax, _const(63.0, smax)), "Q4_K super-block scale", x)
    dmin = _fp16(torch.div(mmax, _const(63.0, mmax)), "Q4_K super-block min", x)
    return sc, m, d, dmin


def _q4k_chunk(xb: torch.Tensor, want_codes: bool):
    """Q4_K of sub-blocks ``xb`` ``[B, 32]`` (B a multiple of 8, consecutive super-blocks). Returns
    ``(codes or values [B, 32], sc [B/8, 8], m [B/8, 8], d [B/8], dmin [B/8])``."""
    lx = torch.empty((32, 2, xb.shape[0]), dtype=xb.dtype, device=xb.device)
    x = lx[:, 1]
    x.copy_(xb.t())  # [32, B], position-major
    scale, mn, inv, off, ends = _q4k_search(lx, want_codes)
    sc, m, d, dmin = _q4k_super(scale.view(-1, 8), mn.view(-1, 8), x)
    a = (d.to(torch.float32).unsqueeze(-1) * sc).reshape(-1)  # F(d) * sc, exact
    bm = (dmin.to(torch.float32).unsqueeze(-1) * m).reshape(-1)  # F(dmin) * m, exact
    keep = a == 0
    a_safe = torch.where(keep, torch.ones_like(a), a)
    v = torch.add(x, bm).div_(a_safe)  # (x + dm) / d: a true division
    u = _rni_(v, torch.div(ends + bm, a_safe)).clamp_(0, 15).add_(0.0)  # -0 -> +0, as the C integer
    if want_codes:
        if bool(keep.any()):  # these sub-blocks keep the codes of the search (their values are -dm whatever u)
            lq = _rni_(torch.sub(x, off).mul_(inv), inv * (ends[0] - off)).clamp_(0, 15)
            u = torch.where(keep, lq, u)
        out = u.to(torch.uint8)
    else:
        out = u.mul_(a).sub_(bm)  # f32(A * u) - B
    return out.t(), sc, m, d, dmin


def _q4k_run(weight: torch.Tensor, want_codes: bool):
    x = _checked(weight, Q4_K_BLOCK, "Q4_K")
    rows, n = x.shape
    nsb = n // 256
    sub = x.reshape(-1, 32)
    out = torch.empty(sub.shape, dtype=torch.uint8 if want_codes else torch.float32, device=x.device)
    sc = torch.empty((rows * nsb, 8), dtype=torch.float32, device=x.device)
    m = torch.empty_like(sc)
    d = torch.empty(rows * nsb, dtype=torch.float16, device=x.device)
    dmin = torch.empty_like(d)
    for a, b in _chunks(rows * nsb, 256, x.device):
        o, sc_, m_, d_, dm_ = _q4k_chunk(sub[8 * a:8 * b], want_codes)
        out[8 * a:8 * b] = o
        sc[a:b], m[a:b], d[a:b], dmin[a:b] = sc_, m_, d_, dm_
    return out.view(rows, n), sc.view(rows, nsb, 8), m.view(rows, nsb, 8), d.view(rows, nsb), dmin.view(rows, nsb)


def quantize_q4_k(weight: torch.Tensor) -> Q4KQuantized:
    """``quantize_row_q4_K_ref`` of each row of fp32 ``weight`` ``[rows, n]`` (``n % 256 == 0``)."""
    codes, sc, m, d, dmin = _q4k_run(weight, True)
    return Q4KQuantized(codes=codes, d=d, dmin=dmin, scales=sc.to(torch.uint8), mins=m.to(torch.uint8))


def dequantize_q4_k(q: Q4KQuantized) -> torch.Tensor:
    """``dequantize_row_q4_K``: ``f32(F(d) * sc * u) - F(dmin) * m``, fp32 ``[rows, n]``."""
    rows, n = q.codes.shape
    a = q.d.to(torch.float32).unsqueeze(-1) * q.scales.to(torch.float32)  # [rows, nsb, 8]
    b = q.dmin.to(torch.float32).unsqueeze(-1) * q.mins.to(torch.float32)
    u = q.codes.to(torch.float32).view(rows, n // 256, 8, 32)
    return (u * a.unsqueeze(-1)).sub_(b.unsqueeze(-1)).view(rows, n)


def fake_quantize_q4_k(weight: torch.Tensor) -> torch.Tensor:
    """``dequantize_q4_k(quantize_q4_k(weight))``, computed in one pass."""
    return _q4k_run(weight, False)[0]


# ----------------------------------------------------------------------------------------------------------- Q6_K


def _q6k_search(x: torch.Tensor):
    """``make_qx_quants(16, 32, x, L, 1, NULL)`` per column of ``x`` ``[16, B]``. Returns ``(scale, inv, zero,
    xmin, xmax)``: the sub-block codes are ``clamp(nearest_int(inv * x), -32, 31) + 32``, or 0 where ``zero``."""
    xmin, xmax = x.amin(dim=0), x.amax(dim=0)
    _require_finite(torch.stack([xmin, xmax]), "Q6_K")
    amax, mx = _first_extreme(x)
    zero = amax < _GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x
    buf_l = torch.empty_like(x)
    buf_t = torch.empty_like(x)

    def sums(isc):
        lq = torch.mul(x, isc, out=buf_l).round_().clamp_(-32, 31)  # |isc * x| <= 33: round is nearest_int
        slx = _seq_sum(torch.mul(wx, lq, out=buf_t))
        sl2 = _seq_sum(torch.mul(w, lq, out=buf_t).mul_(lq))
        return slx, sl2

    inv = _rdiv(-32.0, mx)
    slx, sl2 = sums(inv)
    scale = torch.where(sl2 != 0, torch.div(slx, sl2), torch.zeros_like(slx))
    best = scale * slx
    for c in _Q6K_CANDIDATES:
        isc = _rdiv(c, mx)
        slx, sl2 = sums(isc)
        win = (sl2 > 0) & (slx * slx > best * sl2)
        inv = torch.where(win, isc, inv)
        scale = torch.where(win, torch.div(slx, sl2), scale)
        best = torch.where(win, scale * slx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, inv, zero, xmin, xmax


def _q6k_chunk(xb: torch.Tensor, want_codes: bool):
    """Q6_K of sub-blocks ``xb`` ``[B, 16]`` (B a multiple of 16). Returns ``(codes or values [B, 16], sc [B/16,
    16] (fp32 integers), d [B/16])``."""
    x = xb.t().contiguous()  # [16, B]
    scale, inv, zero, xmin, xmax = _q6k_search(x)
    if bool(torch.isnan(scale).any()):  # x * x overflowed: ggml would silently store zeros
        raise FormatError(f"weights too large for Q6_K: x * x overflows fp32 (largest |weight| "
                          f"{float(x.abs().max()):.6g}); rescale the weight or keep this tensor unquantized")
    s16 = scale.view(-1, 16).t()  # [16, S]
    amax, smax = _first_extreme(s16)
    sb_zero = amax < _GROUP_MAX_EPS
    i_s = _rdiv(-128.0, torch.where(sb_zero, torch.ones_like(smax), smax))
    d = _fp16(torch.where(sb_zero, torch.zeros_like(i_s), _rdiv(1.0, i_s)), "Q6_K super-block scale", x)
    p = i_s.unsqueeze(-1) * scale.view(-1, 16)
    sc = (p.round() if _in_ni_range(p) else _nearest_int_exact(p)).clamp_(max=127).add_(0.0)  # int8: no -0
    sc = torch.where(sb_zero.unsqueeze(-1), torch.zeros_like(sc), sc)
    a = (d.to(torch.float32).unsqueeze(-1) * sc).reshape(-1)  # F(d) * sc, exact
    keep = a == 0
    a_safe = torch.where(keep, torch.ones_like(a), a)
    v = torch.div(x, a_safe)
    u = _rni_(v, torch.div(xmin, a_safe), torch.div(xmax, a_safe)).clamp_(-32, 31).add_(32)
    if bool(keep.any()):  # sc == 0 (or an all-zero super-block): the search's codes, 0 for an all-zero sub-block
        lq = torch.mul(x, inv).round_().clamp_(-32, 31).add_(32)
        lq = torch.where(zero | sb_zero.repeat_interleave(16), torch.zeros_like(lq), lq)
        u = torch.where(keep, lq, u)
    out = u.to(torch.uint8) if want_codes else u.sub_(32).mul_(a)  # (F(d) * sc) * q
    return out.t(), sc, d


def _q6k_run(weight: torch.Tensor, want_codes: bool):
    x = _checked(weight, Q6_K_BLOCK, "Q6_K")
    rows, n = x.shape
    nsb = n // 256
    sub = x.reshape(-1, 16)
    out = torch.empty(sub.shape, dtype=torch.uint8 if want_codes else torch.float32, device=x.device)
    sc = torch.empty((rows * nsb, 16), dtype=torch.float32, device=x.device)
    d = torch.empty(rows * nsb, dtype=torch.float16, device=x.device)
    for a, b in _chunks(rows * nsb, 256, x.device):
        o, sc_, d_ = _q6k_chunk(sub[16 * a:16 * b], want_codes)
        out[16 * a:16 * b] = o
        sc[a:b], d[a:b] = sc_, d_
    return out.view(rows, n), sc.view(rows, nsb, 16), d.view(rows, nsb)


def quantize_q6_k(weight: torch.Tensor) -> Q6KQuantized:
    """``quantize_row_q6_K_ref`` of each row of fp32 ``weight`` ``[rows, n]`` (``n % 256 == 0``)."""
    codes, sc, d = _q6k_run(weight, True)
    return Q6KQuantized(codes=codes, d=d, scales=sc.to(torch.int8))


def dequantize_q6_k(q: Q6KQuantized) -> torch.Tensor:
    """``dequantize_row_q6_K``: ``(F(d) * sc) * (u - 32)`` (exact), fp32 ``[rows, n]``."""
    rows, n = q.codes.shape
    a = q.d.to(torch.float32).unsqueeze(-1) * q.scales.to(torch.float32)  # [rows, nsb, 16]
    u = q.codes.to(torch.float32).view(rows, n // 256, 16, 16).sub_(32)
    return (a.unsqueeze(-1) * u).view(rows, n)


def fake_quantize_q6_k(weight: torch.Tensor) -> torch.Tensor:
    """``dequantize_q6_k(quantize_q6_k(weight))``, computed in one pass."""
    return _q6k_run(weight, False)[0]


# ----------------------------------------------------------------------------------------------------------- Q5_0


def _q50_chunk(xb: torch.Tensor, want_codes: bool):
    """Q5_0 of blocks ``xb`` ``[B, 32]``: ``(codes or values [B, 32], d fp16 [B])``."""
    amax, mx = _first_extreme_last(xb)
    _require_finite(amax, "Q5_0")
    dd = torch.div(mx, _const(-16.0, mx))  # signed: an all-zero block gives -0.0
    inv = torch.where(dd != 0, _rdiv(1.0, torch.where(dd != 0, dd, torch.ones_like(dd))), torch.zeros_like(dd))
    d = _fp16(dd, "Q5_0 scale", xb)
    v = torch.mul(xb, inv.unsqueeze(-1))
    bad = torch.isinf(inv)  # fp32-subnormal d: x * id is not finite, which the x86 build turns into code 0
    u = v.add_(16.5).trunc_().clamp_(0, 31)  # min(31, (int8_t)(x * id + 16.5)); >= 0 for finite id
    if bool(bad.any()):
        u = torch.where(bad.unsqueeze(-1), torch.zeros_like(u), u)
    out = u.to(torch.uint8) if want_codes else u.sub_(16).mul_(d.to(torch.float32).unsqueeze(-1))
    return out, d


def _small_run(weight, block, name, chunk_fn, want_codes, code_dtype):
    x = _checked(weight, block, name)
    rows, n = x.shape
    blocks = x.reshape(-1, block)
    out = torch.empty(blocks.shape, dtype=code_dtype if want_codes else torch.float32, device=x.device)
    d = torch.empty(blocks.shape[0], dtype=torch.float16, device=x.device)
    for a, b in _chunks(blocks.shape[0], block, x.device):
        out[a:b], d[a:b] = chunk_fn(blocks[a:b], want_codes)
    return out.view(rows, n), d.view(rows, n // block)


def quantize_q5_0(weight: torch.Tensor) -> Q50Quantized:
    """``quantize_row_q5_0_ref`` of each row of fp32 ``weight`` ``[rows, n]`` (``n % 32 == 0``)."""
    codes, d = _small_run(weight, Q5_0_BLOCK, "Q5_0", _q50_chunk, True, torch.uint8)
    return Q50Quantized(codes=codes, d=d)


def dequantize_q5_0(q: Q50Quantized) -> torch.Tensor:
    """``dequantize_row_q5_0``: ``(u - 16) * F(d)`` (exact), fp32 ``[rows, n]``."""
    rows, n = q.codes.shape
    u = q.codes.to(torch.float32).view(rows, n // 32, 32).sub_(16)
    return u.mul_(q.d.to(torch.float32).unsqueeze(-1)).view(rows, n)


def fake_quantize_q5_0(weight: torch.Tensor) -> torch.Tensor:
    """``dequantize_q5_0(quantize_q5_0(weight))``, computed in one pass."""
    return _small_run(weight, Q5_0_BLOCK, "Q5_0", _q50_chunk, False, torch.uint8)[0]


# ----------------------------------------------------------------------------------------------------------- Q8_0


def _roundf_(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero) in place, exact for ``|v| < 2**23``: ``trunc(v + copysign(h, v))`` with
    ``h`` = the float just below 0.5 (a fractional part below .5 stays below the next integer, .5 reaches it)."""
    h = torch.where(v < 0, _const(-_ROUNDF_HALF, v), _const(_ROUNDF_HALF, v))
    return v.add_(h).trunc_()


def _q80_chunk(xb: torch.Tensor, want_codes: bool):
    """Q8_0 of blocks ``xb`` ``[B, 32]``: ``(codes or values [B, 32], d fp16 [B])``."""
    amax = xb.abs().amax(dim=-1)
    _require_finite(amax, "Q8_0")
    dd = torch.div(amax, _const(127.0, amax))
    inv = torch.where(dd != 0, _rdiv(1.0, torch.where(dd != 0, dd, torch.ones_like(dd))), torch.zeros_like(dd))
    d = _fp16(dd, "Q8_0 scale", xb)
    q = _roundf_(torch.mul(xb, inv.unsqueeze(-1))).add_(0.0)  # an int8 code has no -0
    bad = torch.isinf(inv)  # fp32-subnormal d: x * id is not finite, which the x86 build turns into 0
    if bool(bad.any()):
        q = torch.where(bad.unsqueeze(-1), torch.zeros_like(q), q)
    out = q.to(torch.int8) if want_codes else q.mul_(d.to(torch.float32).unsqueeze(-1))
    return out, d


def quantize_q8_0(weight: torch.Tensor) -> Q80Quantized:
    """``quantize_row_q8_0_ref`` of each row of fp32 ``weight`` ``[rows, n]`` (``n % 32 == 0``)."""
    codes, d = _small_run(weight, Q8_0_BLOCK, "Q8_0", _q80_chunk, True, torch.int8)
    return Q80Quantized(codes=codes, d=d)


def dequantize_q8_0(q: Q80Quantized) -> torch.Tensor:
    """``dequantize_row_q8_0``: ``q * F(d)`` (exact), fp32 ``[rows, n]``."""
    rows, n = q.codes.shape
    u = q.codes.to(torch.float32).view(rows, n // 32, 32)
    return u.mul_(q.d.to(torch.float32).unsqueeze(-1)).view(rows, n)


def fake_quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """``dequantize_q8_0(quantize_q8_0(weight))``, computed in one pass."""
    return _small_run(weight, Q8_0_BLOCK, "Q8_0", _q80_chunk, False, torch.int8)[0]

