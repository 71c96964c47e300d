"""Recover the exact int4 lattice (Q4_0 codes and fp16 scales) from weights stored as bf16 values of it.

Google publishes its QAT checkpoints as bf16 safetensors of the fake-quantized weights: each stored value is
``bf16(k * D)`` with a code ``k`` in [-8, 7] and an fp16 scale ``D`` per block of 32 weights (Q4_0). ``k * D`` needs
up to 3 + 11 = 14 significant bits and bf16 keeps 8. Re-quantizing the stored values (llama.cpp's convert +
Q4_0) gets every code right (``v / bf16(D)`` is within 1/16 of ``k``) but re-derives the scale from the rounded
extreme: ``bf16(D)``, 8 significant bits, the trained fp16 scale in ~12% of blocks (2048 x 8192 Gaussian weights,
``benchmarks/lattice.py``). This module inverts the storage instead: per block it finds every fp16 ``D`` with
``bf16(k * D)`` equal to every stored value, exactly as torch rounds fp32 -> bf16 (round half to even), and picks
one (the trained one in ~40% of blocks; 3x less squared error than the naive scale).

How (vectorised torch, fp32, chunks of rows; about the time of int4-block's ``quantize`` of the same tensor):

* Hypothesis on the extreme: Q4_0 gives the block's signed extreme ``m`` the code -8 (its rule is
  ``d = m / -8``). Blocks that fail it are tried with the extreme at +7 and at -7 (grids such as torchao's
  ``max / 7.5`` or a symmetric [-7, 7] one).
* Each element's code is ``k = round(v / D0)``, ``D0 = |m| / K`` with the hypothesis' sign (unique: bf16 moves
  ``k * D`` by at most ``8 * 2**-8`` of ``D``; for K = 8 these are Q4_0's codes of the stored values), and ``v``
  bounds ``|k| * |D|`` by its rounding interval (``_bounds``: the ends moved by a margin that encodes round half
  to even and keeps every quotient far from every fp16 value), so ``lo / |k| <= |D| <= hi / |k|``.
* The consistent scales of a block are the fp16 values between the largest lower and the smallest upper bound:
  a contiguous run (of 1-9 values on Gaussian weights: bf16 cannot tell them apart), from which ``rule`` picks
  one. ``tests/test_lattice.py`` checks count and ends against trying every fp16 candidate by the forward rule.

Tie rule (``RULES``): ``q4_0`` (default) takes the consistent scale nearest to what Q4_0's own rule gives on the
stored values, ``fp16(|m| / 8)`` (for the -8 hypothesis the stored extreme is ``8 * bf16(|D|)``, so this is the
centre of the extreme's interval and what a naive conversion would pick when it is consistent); ``middle`` the
median of the consistent run; ``smallest`` / ``largest`` its ends. Every choice reproduces every stored bf16 value;
they differ only below bf16's resolution, by at most a few fp16 steps of ``D`` (``spread_msd`` measures it).

Q4_0's zero-code convention: an all-zero block (stored max 0, including a trained scale that underflowed fp16)
is ``D = 0`` with codes 8, what ggml's quantizer writes for it; ``-0.0`` values compare equal to zero.

A block recovered with its extreme at -8 is a fixed point of Q4_0: re-quantizing the recovered fp32 values
``k * D`` with int4-block's rule gives the same codes and scale (the extreme is ``-8 * D``, so ``d = D`` exactly,
and ``k * D * (1 / D)`` is within ``8 * 2**-24`` of ``k``). A block whose extreme is +7 or -7 is on an int4
lattice that Q4_0's rule can never produce (it always puts -8 at the extreme): such blocks are exact only where
the codes are written directly (``q4_0_blocks``), not through latent weights (``TensorLattice.not_fixed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gemma3_qat.formats import FormatError, Int4Block, Int4Channel, QuantizedWeight, get_format

__all__ = ["RULES", "LAYOUTS", "GroupRecovery", "TensorLattice", "recover_groups", "recover_tensor",
           "lattice_fractions", "looks_like", "RecoveringInt4Block", "RecoveringInt4Channel", "recovering_format"]

RULES = ("q4_0", "middle", "smallest", "largest")
LAYOUTS = ("int4-block", "int4-channel")  # the toolkit's int4 formats that recovery produces
STORED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP16_MAX_BITS = 0x7BFF  # the largest finite fp16
# Elements per elementwise pass. One thread: ~1 MB temporaries, cache-resident (2**16 pays per-op overhead,
# 2**20 misses the cache). Several threads: 16 MB, so that each op's fork/join is amortised (measured on 2 busy
# cores: 2**18 chunks ran 2-4x slower than one pass over the tensor); ~20 temporaries, ~0.3 GB at most.
_CHUNK_ONE_THREAD, _CHUNK_THREADS = 1 << 18, 1 << 22
_HYPOTHESES = ((8, -1), (7, 1), (7, -1))  # (|k| of the extreme, sign of D relative to the extreme's sign)


@dataclass
class GroupRecovery:
    """Per group of weights sharing one scale (a block of 32, or a row): the recovered lattice point.

    ``codes``: uint8 ``q = k + 8`` ``[G, n]``; ``scales``: fp16 ``[G]`` (0 for an all-zero group; for a group off
    the lattice, Q4_0's rule on its stored values); ``n_scales``: how many fp16 scales are consistent (0: off the
    lattice); ``extreme_code``: the extreme's code ``k`` (-8, +7 or -7; 0 for a zero group and off the lattice);
    ``spread``: largest minus smallest consistent ``|D|`` (fp32); ``error``: for a group off the lattice, the
    largest distance of a stored value from the nearest point of the lattice of its centre scale, in units of that
    scale (0 on the lattice); ``sumsq``: the sum of ``k**2`` over the group.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    n_scales: torch.Tensor
    extreme_code: torch.Tensor
    spread: torch.Tensor
    error: torch.Tensor
    sumsq: torch.Tensor  # per group: the sum of k**2 (what spread and scale weigh in the tensor's statistics)

    @property
    def on_lattice(self) -> torch.Tensor:
        return self.n_scales > 0


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise FormatError(f"unknown tie rule {rule!r}; choose one of: {', '.join(RULES)}")


_MARGIN = 256  # fp32 steps: every product k * D off a rounding boundary is >= 512 steps from it (see _bounds)


def _bounds(v: torch.Tensor, stored_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``|v|`` and the fp32 bounds ``lo <= |k| * |D| <= hi`` under which ``stored_dtype`` rounds to ``|v|``.

    The rounding interval's ends (midpoints with the neighbours) are moved by ``_MARGIN`` fp32 steps, outwards
    where they round to ``|v|`` (its last mantissa bit even: round half to even) and inwards where they do not:
    the products ``k * D`` and the midpoints lie on grids of at least ``2**(e_D - 11)`` (``e_D``: ``D``'s binade)
    while 256 fp32 steps at ``|k * D| < 16 * 2**e_D`` are at most ``2**(e_D - 12)``, so the moved bounds accept
    exactly the products the rounding maps to ``v``, and the quotients by ``|k|`` stay far (relatively ``2**-15``)
    from every fp16 candidate, beyond fp32's rounding. ``lo`` is NaN where ``v == 0`` (no constraint, see caller).
    """
    bits = v.view(torch.int32) & 0x7FFFFFFF
    a = bits.view(torch.float32)
    if stored_dtype == torch.float32:  # k * D is exact in fp32: the interval is the value itself
        return a, (bits - _MARGIN).view(torch.float32), (bits + _MARGIN).view(torch.float32)
    if stored_dtype == torch.bfloat16:  # a bf16 value is an fp32 value with 16 zero low bits: ends at +-0x8000
        t = ((bits >> 7) & (2 * _MARGIN)).neg_().add_(0x8000 + _MARGIN)  # bit 16 (mantissa odd) -> inwards
        return a, (bits - t).view(torch.float32), (bits + t).view(torch.float32)
    half = a.to(torch.float16).view(torch.int16).to(torch.int32)  # fp16: midpoints with the neighbours, in fp32
    prev = (half - 1).clamp_(min=0).to(torch.int16).view(torch.float16).to(torch.float32)
    nxt = (half + 1).to(torch.int16).view(torch.float16).to(torch.float32)
    t = (half & 1) * (2 * _MARGIN) - _MARGIN
    lo = ((a + prev) * 0.5).view(torch.int32) + t
    lo = torch.where(a == 0, -1, lo)  # NaN bits, as for the other dtypes
    return a, lo.view(torch.float32), (((a + nxt) * 0.5).view(torch.int32) - t).view(torch.float32)


def _fp16_bits(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The bits (int32) of the smallest fp16 >= x (``up``) or the largest <= x, for x >= 0; clamped to the finite
    positive range [1, 0x7BFF] (so an empty range comes out with lower > upper)."""
    h = x.to(torch.float16)
    bits = h.view(torch.int16).to(torch.int32)
    back = h.to(torch.float32)
    bits = bits + (back < x).to(torch.int32) if up else bits - (back > x).to(torch.int32)
    return bits.clamp_(1, _FP16_MAX_BITS) if up else bits.clamp_(0, _FP16_MAX_BITS)


def _bits_fp32(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int16).view(torch.float16).to(torch.float32)


def _element_pass(v: torch.Tensor, stored_dtype: torch.dtype, sign_d: torch.Tensor, ea: torch.Tensor, K: int):
    """One chunk of groups ``v`` ``[g, n]`` (fp32) under one extreme hypothesis (the extreme's code is ``K`` with
    ``D``'s sign ``sign_d``): the signed codes ``k`` (fp32) and per group the bounds ``low <= |D| <= high`` and the
    largest code.

    ``k = round(v / D0)`` with ``D0 = sign_d * |m| / K``: unique (bf16 moves ``k * D`` by at most ``8 * 2**-8`` of
    ``D``), and for ``K = 8`` the codes Q4_0's own rule gives the stored values. ``|D| >= lo / |k|`` and
    ``<= hi / |k|`` for every element; the products by ``fl(1 / |k|)`` are within 2**-23 of the quotients, far
    inside ``_bounds``' margin. Zeros (``|k| = 0``): ``lo`` is NaN -> no lower bound, ``hi * inf`` = no upper
    bound; a nonzero value with ``|k| = 0`` gives ``lo * inf = inf``: no scale.
    """
    _, lo, hi = _bounds(v, stored_dtype)
    k = torch.mul(v, (sign_d * K / ea).unsqueeze(1)).round_()
    inv = k.abs().reciprocal_()
    low = lo.mul_(inv).nan_to_num_(nan=0.0).amax(dim=1)
    high = hi.mul_(inv).amin(dim=1)
    return k, low, high, k.amax(dim=1), torch.linalg.vector_norm(k, dim=1).square_()


def _group_stage(low, high, ea, kmax, K: int, rule: str):
    """Per group, from its bounds: (number of consistent fp16 scales, the chosen |D|, largest - smallest)."""
    first, last = _fp16_bits(low, up=True), _fp16_bits(high, up=False)
    ok = (first <= last) & torch.isfinite(low) & torch.isfinite(high) & (kmax <= 7)  # code +8 does not exist
    if rule == "q4_0":  # nearest to Q4_0's rule on the stored values: the run is contiguous, so clamp into it
        pick = (ea / K).to(torch.float16).view(torch.int16).to(torch.int32)
        pick = torch.minimum(torch.maximum(pick, first), last)
    else:
        pick = {"middle": (first + last) // 2, "smallest": first, "largest": last}[rule]
    n_scales = torch.where(ok, last - first + 1, 0).to(torch.int64)
    spread = torch.where(ok, _bits_fp32(last) - _bits_fp32(first), 0.0)
    return n_scales, _bits_fp32(pick), spread


def _signed_extreme(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign (+-1, fp32) and magnitude of each group's extreme (the largest |v|; +a and -a tied: +)."""
    hi, lo = v.amax(dim=1), v.amin(dim=1)
    return torch.where(hi >= -lo, 1.0, -1.0), torch.maximum(hi, -lo)


def _lattice_error(v: torch.Tensor, sign_e: torch.Tensor, ea: torch.Tensor) -> torch.Tensor:
    """Off-lattice groups: the largest ``|v - k * D|`` in units of ``D``, for the centre scale ``fp16(|m| / 8)``
    and the nearest codes (inf for non-finite values). bf16's own rounding of on-lattice values is up to
    ``8 * 2**-8 = 0.03`` of these units: more means the values are not on that lattice."""
    d = (-sign_e * ea / 8).to(torch.float16).to(torch.float32).unsqueeze(1)
    safe = torch.where(d == 0, 1.0, d)
    k = (v / safe).round_().clamp_(-8, 7)
    return ((v - k * d).abs() / safe.abs()).amax(dim=1).nan_to_num_(nan=torch.inf)


class _Groups:
    """The stored groups, read as fp32 chunks of about ``_CHUNK_*`` elements (all of them, or the rows ``idx``)."""

    def __init__(self, values: torch.Tensor, stored_dtype: torch.dtype):
        self.values, self.stored_dtype = values, stored_dtype
        chunk = _CHUNK_ONE_THREAD if not values.is_cuda and torch.get_num_threads() == 1 else _CHUNK_THREADS
        self.step = max(1, chunk // max(values.shape[1], 1))

    def chunks(self, idx: torch.Tensor | None = None):
        count = self.values.shape[0] if idx is None else idx.numel()
        for start in range(0, count, self.step):
            stop = min(start + self.step, count)
            rows = self.values[start:stop] if idx is None else self.values.index_select(0, idx[start:stop])
            v = rows.to(torch.float32)
            if rows.dtype != self.stored_dtype and not torch.equal(v.to(self.stored_dtype).to(torch.float32), v):
                raise FormatError(f"the values are not {self.stored_dtype} values; pass the dtype they were "
                                  "stored in")
            yield slice(start, stop), v


def _hypothesis(groups: _Groups, idx, sign_e, ea, K: int, rel: int, codes: torch.Tensor):
    """Run one extreme hypothesis over the groups ``idx`` (None: all): writes their codes ``k + 8`` into
    ``codes`` (rows as ``idx`` orders them) and returns their bounds and largest codes."""
    sign_d = sign_e * rel
    low, high, kmax, sumsq = (torch.empty_like(ea) for _ in range(4))
    for rows, v in groups.chunks(idx):
        k, low[rows], high[rows], kmax[rows], sumsq[rows] = _element_pass(v, groups.stored_dtype, sign_d[rows],
                                                                          ea[rows], K)
        codes[rows] = k.add_(8.0).nan_to_num_(nan=8.0)  # NaN: a zero group (|m| = 0), fixed by the caller
    return low, high, kmax, sumsq


def recover_groups(values: torch.Tensor, *, stored_dtype: torch.dtype | None = None,
                   rule: str = "q4_0") -> GroupRecovery:
    """The lattice point of each row of ``values`` ``[G, n]``: ``n`` weights sharing one fp16 scale.

    ``values``: the stored weights, in their stored dtype or as fp32 copies of them (then say ``stored_dtype``:
    the rounding that produced them decides which scales are consistent). Elementwise work runs in chunks of
    about ``_CHUNK_*`` elements; the per-group candidate stage once over all groups; on ``values``' device.
    """
    _check_rule(rule)
    stored_dtype = stored_dtype or values.dtype
    if stored_dtype not in STORED_DTYPES:
        raise FormatError(f"lattice recovery reads bf16, fp16 or fp32 weights, got {stored_dtype}")
    if values.dim() != 2:
        raise FormatError(f"expected [groups, n] values, got shape {tuple(values.shape)}")
    G, n = values.shape
    device = values.device
    groups = _Groups(values, stored_dtype)
    sign_e, ea, low, high, kmax, sumsq = (torch.empty(G, dtype=torch.float32, device=device) for _ in range(6))
    codes = torch.empty((G, n), dtype=torch.uint8, device=device)
    # Q4_0's rule first (extreme at -8), on every group; the groups it leaves are tried with the others
    for rows, v in groups.chunks():
        sign_e[rows], ea[rows] = _signed_extreme(v)
        k, low[rows], high[rows], kmax[rows], sumsq[rows] = _element_pass(v, stored_dtype, -sign_e[rows],
                                                                          ea[rows], 8)
        codes[rows] = k.add_(8.0).nan_to_num_(nan=8.0)  # NaN: a zero group (|m| = 0), fixed below
    n_scales, d, spread = _group_stage(low, high, ea, kmax, 8, rule)
    scales = -sign_e * d
    extreme = torch.where(n_scales > 0, -8, 0).to(torch.int8)
    zero = ea == 0
    if zero.any():  # the zero block: D = 0, codes 8 (Q4_0's convention), by definition one point
        n_scales[zero], scales[zero], spread[zero], extreme[zero], sumsq[zero] = 1, 0.0, 0.0, 0, 0.0
        codes[zero] = 8
    todo = n_scales == 0
    for K, rel in _HYPOTHESES[1:]:
        if not todo.any():
            break
        idx = todo.nonzero().squeeze(1)
        sub_codes = torch.empty((idx.numel(), n), dtype=torch.uint8, device=device)
        low, high, kmax, sub_sumsq = _hypothesis(groups, idx, sign_e[idx], ea[idx], K, rel, sub_codes)
        count, d, s = _group_stage(low, high, ea[idx], kmax, K, rule)
        hit = count > 0
        at = idx[hit]
        n_scales[at], scales[at], spread[at] = count[hit], (sign_e[idx] * rel * d)[hit], s[hit]
        codes[at], sumsq[at] = sub_codes[hit], sub_sumsq[hit]
        extreme[at] = 7 * rel  # the extreme's code k: its value is k * D
        todo[at] = False
    error = torch.zeros(G, dtype=torch.float32, device=device)
    off = todo.nonzero().squeeze(1)
    if off.numel():  # off the lattice: Q4_0's rule on the stored values (what a naive conversion writes)
        q4_0_rule = Int4Channel().quantize  # Q4_0's rule over each group (= int4-block's on a block of 32)
        for rows, v in groups.chunks(off):
            qw = q4_0_rule(v)
            at = off[rows]
            codes[at], scales[at] = qw.codes, qw.scales.to(torch.float32).reshape(-1)
            sumsq[at] = (qw.codes.to(torch.float32) - 8).square_().sum(dim=1)
            error[at] = _lattice_error(v, sign_e[at], ea[at])
    return GroupRecovery(codes, scales.to(torch.float16), n_scales, extreme, spread, error, sumsq)


# ------------------------------------------------------------------------------------------------- per tensor


@dataclass
class TensorLattice:
    """What recovery found in one weight: counts per group (a block of 32 or a row) and the recovered weight.

    ``quantized``: the ``QuantizedWeight`` (``format`` int4-block or int4-channel): on-lattice groups exactly,
    the others by Q4_0's rule on their stored values. ``scale_counts``: how many groups admit 1, 2, ... consistent
    scales. ``extreme_codes``: groups by the code of their extreme (-8: Q4_0's rule; +7/-7: another grid; 0: zero
    groups). ``worst_error``: over the groups off the lattice, the largest distance of a stored value from its
    block's nearest lattice point, in units of the scale (up to 1 in an ordinary checkpoint; bf16's rounding of
    on-lattice values alone is at most 0.03). ``spread_msd``: the mean squared difference, per weight, between
    the dequantized values of the smallest and the largest consistent scale: what the tie rule can change;
    ``weight_ms`` (the mean squared recovered value) gives its scale.
    """

    name: str
    shape: tuple[int, ...]
    format: str
    groups: int
    on_lattice: int
    zero: int
    scale_counts: dict[int, int]
    extreme_codes: dict[int, int]
    worst_error: float
    spread_msd: float
    weight_ms: float
    quantized: QuantizedWeight | None = field(default=None, repr=False)

    @property
    def fraction(self) -> float:
        return self.on_lattice / self.groups if self.groups else 1.0

    @property
    def ambiguous(self) -> int:
        """Groups with several consistent scales (the tie rule chose)."""
        return sum(n for k, n in self.scale_counts.items() if k > 1)

    @property
    def not_fixed(self) -> int:
        """Recovered groups whose extreme is +7 or -7: Q4_0's rule on their values would not give them back."""
        return sum(n for k, n in self.extreme_codes.items() if k in (7, -7))

    def line(self) -> str:
        """One line for a table: fraction, ambiguity, and the worst error when some groups are off."""
        unit = "blocks" if self.format == "int4-block" else "rows"
        text = (f"{self.name or 'weight'} {tuple(self.shape)}: {self.on_lattice:,}/{self.groups:,} {unit} on the {self.format} lattice "
                f"({100 * self.fraction:.2f}%), {self.ambiguous:,} with several consistent scales")
        if self.on_lattice < self.groups:
            text += f", worst error off it {self.worst_error:.3g} scale steps"
        if self.not_fixed:
            text += f", {self.not_fixed:,} with a +-7 extreme (not Q4_0's rule)"
        return text


def _group_view(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    if weight.dim() != 2:
        raise FormatError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    get_format(fmt).check_shape(tuple(weight.shape))
    if fmt == "int4-block":
        return weight.reshape(-1, Int4Block.granularity)
    if fmt == "int4-channel":
        return weight
    raise FormatError(f"lattice recovery produces {' or '.join(LAYOUTS)}, not {fmt}")


def recover_tensor(weight: torch.Tensor, fmt: str = "int4-block", *, name: str = "", rule: str = "q4_0",
                   stored_dtype: torch.dtype | None = None, keep: bool = True) -> TensorLattice:
    """Recover one ``[out, in]`` weight's lattice in ``fmt`` (int4-block: per block of 32; int4-channel: per row).

    ``keep``: keep the ``QuantizedWeight`` (False: counts only, e.g. to check a whole checkpoint first).
    """
    out, n_in = weight.shape if weight.dim() == 2 else (0, 0)
    groups = _group_view(weight, fmt)
    r = recover_groups(groups, stored_dtype=stored_dtype or weight.dtype, rule=rule)
    on = r.on_lattice
    counts = torch.bincount(r.n_scales).tolist()
    extremes = torch.bincount((r.extreme_code[on].to(torch.int64) + 8), minlength=17).tolist()
    off = ~on
    amb = on & (r.n_scales > 1)
    # statistics from per-group sums (no further pass over the weights): sum over a group of (k * spread)**2 and
    # of (k * D)**2 is sumsq * spread**2 and sumsq * D**2
    spread_sq = float((r.sumsq * r.spread.square()).masked_fill_(~amb, 0.0).sum())
    values_sq = float((r.sumsq * r.scales.to(torch.float32).square()).sum())
    quantized = None
    if keep:
        scales = r.scales.reshape(out, -1) if fmt == "int4-block" else r.scales.reshape(out, 1)
        quantized = QuantizedWeight(fmt, r.codes.reshape(out, n_in), scales)
    numel = max(weight.numel(), 1)
    return TensorLattice(
        name=name, shape=(out, n_in), format=fmt, groups=groups.shape[0], on_lattice=int(on.sum()),
        zero=int(((r.extreme_code == 0) & on).sum()),
        scale_counts={i: c for i, c in enumerate(counts) if i > 0 and c},
        extreme_codes={e - 8: c for e, c in enumerate(extremes) if c},
        worst_error=float(r.error[off].max()) if off.any() else 0.0,
        spread_msd=spread_sq / numel, weight_ms=values_sq / numel, quantized=quantized)


# ------------------------------------------------------------------------------------------------- which lattice


def lattice_fractions(weight: torch.Tensor, *, stored_dtype: torch.dtype | None = None,
                      rows: int = 256) -> dict[str, float]:
    """Fraction of groups on an int4 lattice for each plausible layout, on the first ``rows`` rows: blocks of
    32 (int4-block = Q4_0), 64, 128 and 256 (other group sizes, e.g. torchao's), and whole rows (int4-channel)."""
    w = weight[:rows]
    stored_dtype = stored_dtype or weight.dtype
    out = {}
    for size in (32, 64, 128, 256):
        if w.shape[1] % size == 0:
            r = recover_groups(w.reshape(-1, size), stored_dtype=stored_dtype)
            out["int4-block" if size == 32 else f"int4 group {size}"] = float(r.on_lattice.float().mean())
    out["int4-channel"] = float(recover_groups(w, stored_dtype=stored_dtype).on_lattice.float().mean())
    return out


def looks_like(fractions: dict[str, float]) -> tuple[str, float]:
    """The layout with the largest fraction (ties: the first listed, the finest grouping)."""
    best = max(fractions, key=fractions.get)
    return best, fractions[best]


# ------------------------------------------------------------------------------------------------- as a format


class _Recovering:
    """Mixin: ``quantize`` recovers the lattice from stored values instead of applying Q4_0's rule to latent ones.

    An exporter that hands the stored rows (any row chunk: blocks and rows never straddle chunks) to this format
    writes the recovered codes and scales exactly (``q4_0_blocks``), as it does for a QAT checkpoint's latent
    weights. ``stored_dtype``: the dtype the rows were stored in (the exporter reads them as fp32 copies).
    """

    def __init__(self, stored_dtype: torch.dtype = torch.bfloat16, rule: str = "q4_0"):
        _check_rule(rule)
        self.stored_dtype, self.rule = stored_dtype, rule

    def quantize(self, weight):
        return recover_tensor(weight, self.name, rule=self.rule, stored_dtype=self.stored_dtype).quantized

    def fake_quantize_values(self, weight):
        return self.dequantize(self.quantize(weight))

    def __repr__(self):
        return f"{type(self).__name__}(stored_dtype={self.stored_dtype}, rule={self.rule!r})"


class RecoveringInt4Block(_Recovering, Int4Block):
    pass


class RecoveringInt4Channel(_Recovering, Int4Channel):
    pass


def recovering_format(name: str, stored_dtype: torch.dtype = torch.bfloat16, rule: str = "q4_0"):
    """The recovering twin of int4-block or int4-channel (same name, GGUF type and containers)."""
    classes = {"int4-block": RecoveringInt4Block, "int4-channel": RecoveringInt4Channel}
    if name not in classes:
        raise FormatError(f"lattice recovery produces {' or '.join(LAYOUTS)}, not {name}")
    return classes[name](stored_dtype, rule)
