"""Q4_K, Q6_K, Q5_0 and Q8_0 (``gemma3_qat.formats.kquants``) against ggml's own C quantizer, bit for bit.

The reference is the ``libggml-base.so`` that the llama-cpp-python wheel ships, called through ctypes:
``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix=NULL)`` (the ``quantize_row_*_ref`` paths that
``llama-quantize`` without ``--imatrix`` takes) and ``ggml_get_type_traits(type)->to_float`` (``dequantize_row_*``).
Required: our bytes == C's bytes; our dequantization == C's of the same bytes; our fake-quantized values == C's
dequantization of C's bytes == gguf-py's dequantization of our bytes; pack/unpack round trips.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

from gemma3_qat.formats import kquants as kq
from gemma3_qat.formats.base import FormatError

GGML_TYPE = {"q5_0": 6, "q8_0": 8, "q4_k": 12, "q6_k": 14}
BLOCK = {"q5_0": 32, "q8_0": 32, "q4_k": 256, "q6_k": 256}
TYPES = list(GGML_TYPE)


def fns(name):
    return tuple(getattr(kq, f"{op}_{name}") for op in ("quantize", "dequantize", "fake_quantize", "pack", "unpack"))


# ------------------------------------------------------------------------------------------------ the C reference


class _Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h), the fields up to from_float_ref
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class GGML:
    def __init__(self):
        llama_cpp = pytest.importorskip("llama_cpp")
        path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
        if not os.path.exists(path):
            pytest.skip(f"no {path}")
        self.lib = lib = ctypes.CDLL(path)
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.traits = {}
        for name, t in GGML_TYPE.items():  # the struct layout is right: its names and sizes are ggml's
            tr = lib.ggml_get_type_traits(t).contents
            assert tr.type_name.decode().lower() == name and tr.blck_size == BLOCK[name] and tr.is_quantized
            self.traits[name] = tr

    def quantize(self, name, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        tr = self.traits[name]
        out = np.zeros((rows, n // tr.blck_size * tr.type_size), np.uint8)
        size = self.lib.ggml_quantize_chunk(GGML_TYPE[name], x.ctypes.data, out.ctypes.data, 0, rows, n, None)
        assert size == out.size
        return out

    def dequantize(self, name, data: np.ndarray, n: int) -> np.ndarray:
        data = np.ascontiguousarray(data)
        rows = data.shape[0]
        y = np.empty((rows, n), np.float32)
        _TO_FLOAT(self.traits[name].to_float)(data.ctypes.data, y.ctypes.data, rows * n)
        return y


@pytest.fixture(scope="module")
def ggml():
    return GGML()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared machine OpenMP's second thread makes every op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ the data


def _tie_subblocks(rng, count, width, lattice):
    """Sub-blocks whose grid makes many ``x * id`` land exactly on ``k + 0.5``."""
    out = np.empty((count, width), np.float32)
    for i in range(count):
        if lattice == "q4_k":  # lo = 0, hi = 15: iscale 1, halves between the levels
            v = rng.integers(0, 15, width) + 0.5
            v[0], v[1] = 0.0, 15.0
        elif lattice == "q6_k":  # first |max| = -32: iscale 1
            v = rng.integers(-32, 31, width) + 0.5
            v[0] = -32.0
        elif lattice == "q5_0":  # signed extreme -16: d = 1
            v = rng.integers(-16, 15, width) + 0.5
            v[0] = -16.0
        else:  # q8_0: amax 127: d = 1, roundf vs half-even differ on every .5
            v = rng.integers(-127, 127, width) + 0.5
            v[0] = 127.0
        out[i] = v * np.float32(2.0) ** rng.integers(-12, 4)  # exact power-of-two scaling keeps the ties
    return out


def dataset(lattice: str, seed: int = 0, rows: int = 96, n: int = 2048) -> np.ndarray:
    """fp32 ``[k * rows, n]``: one group of rows per kind of data; the special kinds are cut into sub-blocks."""
    rng = np.random.default_rng(seed)
    g = lambda: rng.standard_normal((rows, n)).astype(np.float32)
    parts = [
        g() * np.float32(0.02),  # Gaussian rows
        (torch.from_numpy(g() * np.float32(0.05)).to(torch.bfloat16).float().numpy()),  # bf16-valued (ties)
        (rng.standard_t(2.5, (rows, n)) * 0.01).astype(np.float32),  # Student-t heavy tails
        (rng.standard_t(1.2, (rows, n)) * 0.01).astype(np.float32),  # very heavy tails
    ]
    out = g() * np.float32(0.02)  # huge outliers
    idx = rng.integers(0, n, (rows, 3))
    np.put_along_axis(out, idx, rng.choice([-1, 1], (rows, 3)) * rng.uniform(10, 2000, (rows, 3)), axis=1)
    parts.append(out.astype(np.float32))
    parts.append(g() * np.float32(1e5))  # large: Q6_K's fp32 sums of w x l overflow, the fp16 scales still fit
    parts.append(g() * np.float32(1e-6))  # tiny: fp16-subnormal d
    parts.append(g() * np.float32(3e-9))  # tinier: d rounds to fp16 zero, dmin too
    sparse = g() * np.float32(0.02)  # sparse rows
    sparse[rng.random((rows, n)) < 0.97] = 0.0
    parts.append(sparse)

    # special sub-blocks (width 16 and 32 cover the sub-blocks of every lattice), mixed into Gaussian rows
    width = 16 if lattice == "q6_k" else 32
    special = (g() * np.float32(0.02)).reshape(-1, width)
    kinds = rng.integers(0, 13, special.shape[0])
    for i in np.flatnonzero(kinds < 12):
        k = kinds[i]
        v = special[i]
        if k == 0:
            v[:] = 0.0  # all zero
        elif k == 1:
            v[:] = -0.0  # all -0.0
        elif k == 2:
            v[:] = rng.choice(np.float32([0.0, -0.0]), width)  # mixed signed zeros
        elif k == 3:
            v[:] = np.float32(rng.uniform(-0.1, 0.1))  # constant (either sign)
        elif k == 4:
            v[:] = np.abs(v)  # all positive
        elif k == 5:
            v[:] = -np.abs(v)  # all negative
        elif k == 6:
            v[rng.random(width) < 0.5] = -0.0  # -0.0 among values
        elif k == 7:
            v[:] = np.float32(rng.uniform(0.01, 0.1)) * (1 + (rng.random(width) < 0.1))  # two levels, positive
        elif k == 8:
            v[:] = _tie_subblocks(rng, 1, width, lattice)[0]
        elif k == 9:
            v[:] = np.float32(1e-39) * rng.standard_normal(width)  # fp32-subnormal values
        elif k == 10:
            v[:] = 0.0
            v[rng.integers(0, width)] = np.float32(rng.uniform(-1, 1))  # a single non-zero
        else:
            v[:] = np.abs(v) * np.float32(1e-6) - np.float32(0.05)  # offset block with a tiny spread
    parts.append(special.reshape(rows, n))
    # whole super-blocks of special sub-blocks (all-zero / constant super-blocks for the K types)
    sb = _tie_subblocks(rng, rows * n // width, width, lattice).reshape(rows, n)
    sb[: rows // 4] = 0.0
    sb[rows // 4: rows // 2] = -0.0
    sb[rows // 2: rows // 2 + 4] = np.float32(-0.03)
    sb[rows // 2 + 4: rows // 2 + 8] = np.float32(0.03)
    parts.append(sb)
    return np.concatenate(parts).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return {name: dataset(name, seed=i) for i, name in enumerate(TYPES)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# ------------------------------------------------------------------------------------------------------ the tests


@pytest.mark.llama
@pytest.mark.parametrize("name", TYPES)
def test_bytes_values_and_gguf_match_ggml(ggml, data, name):
    quantize, dequantize, fake_quantize, pack, unpack = fns(name)
    x = data[name]
    rows, n = x.shape
    c_bytes = ggml.quantize(name, x)
    q = quantize(torch.from_numpy(x))
    ours = pack(q)
    assert ours.dtype == np.uint8 and ours.shape == c_bytes.shape
    bad = np.flatnonzero((ours.reshape(-1, c_bytes.shape[1] // (n // BLOCK[name])) !=
                          c_bytes.reshape(-1, c_bytes.shape[1] // (n // BLOCK[name]))).any(-1))
    assert bad.size == 0, f"{name}: {bad.size} of {rows * n // BLOCK[name]} blocks differ from ggml, first {bad[:8]}"
    assert np.array_equal(ours, c_bytes)

    c_values = torch.from_numpy(ggml.dequantize(name, c_bytes, n))
    fq = fake_quantize(torch.from_numpy(x))
    deq = dequantize(unpack(c_bytes, n))
    assert fq.dtype == deq.dtype == torch.float32 and fq.shape == deq.shape == (rows, n)
    assert torch.equal(deq, c_values)  # == (so -0.0 == 0.0)
    assert torch.equal(fq, c_values)
    assert torch.equal(dequantize(q), c_values)
    # stronger: the same bits, signed zeros included
    assert torch.equal(_bits(fq), _bits(c_values)) and torch.equal(_bits(deq), _bits(c_values))

    import gguf

    ref = gguf.quants.dequantize(ours, getattr(gguf.GGMLQuantizationType, name.upper()))
    assert torch.equal(torch.from_numpy(np.asarray(ref, np.float32)).reshape(rows, n), fq)


@pytest.mark.llama
@pytest.mark.parametrize("name", TYPES)
def test_more_seeds_and_shapes(ggml, name):
    """Other seeds and row lengths: one super-block per row, short rows of 4096, long rows of 16384."""
    quantize, _, fake_quantize, pack, _ = fns(name)
    for seed, (rows, n) in enumerate([(128, 256), (7, 4096), (3, 16384)]):
        x = dataset(name, seed=100 + seed, rows=rows, n=n)
        c_bytes = ggml.quantize(name, x)
        assert np.array_equal(pack(quantize(torch.from_numpy(x))), c_bytes), (rows, n)
        c_values = torch.from_numpy(ggml.dequantize(name, c_bytes, n))
        assert torch.equal(_bits(fake_quantize(torch.from_numpy(x))), _bits(c_values)), (rows, n)


@pytest.mark.llama
def test_data_exercises_the_rules(ggml, data):
    """The data reaches the cases the rules differ on, so the byte comparisons above would catch a quantizer that
    got them wrong: half-way ties where roundf, trunc(+16.5) and round-half-even disagree, zero and non-zero fp16
    scales, and sub-blocks whose integer scale is 0 (Q4_K, Q6_K: codes from the search)."""
    x8 = torch.from_numpy(data["q8_0"]).view(-1, 32)
    d = torch.div(x8.abs().amax(-1), torch.tensor(127.0))
    inv = torch.where(d != 0, torch.div(torch.tensor(1.0), d), torch.zeros_like(d))
    v = x8 * inv.unsqueeze(-1)
    ties = (v - v.trunc()).abs() == 0.5
    assert ties.sum() > 1000  # roundf (half away) and round-half-even give different codes on each
    c_codes = ggml.quantize("q8_0", data["q8_0"]).reshape(-1, 34)[:, 2:].view(np.int8).reshape(-1, 32)
    assert np.array_equal(c_codes[ties.numpy()], torch.where(v < 0, v.floor(), v.ceil())[ties].numpy())

    x5 = torch.from_numpy(data["q5_0"]).view(-1, 32)
    q5 = kq.quantize_q5_0(x5.reshape(data["q5_0"].shape)).codes.view(-1, 32)
    mx = kq._first_extreme_last(x5)[1]
    d5 = torch.div(mx, torch.tensor(-16.0))
    inv5 = torch.where(d5 != 0, torch.div(torch.tensor(1.0), d5), torch.zeros_like(d5))
    t5 = x5 * inv5.unsqueeze(-1) + 16.5
    ties5 = (t5 == t5.trunc()) & (t5.trunc() % 2 == 1)  # x * id at k + 0.5 with k even: half-even rounds down
    assert ties5.sum() > 100
    assert torch.equal(q5[ties5].float(), t5[ties5].clamp(max=31))  # ggml rounds them up

    for name in TYPES:
        q = fns(name)[0](torch.from_numpy(data[name]))
        assert (q.d == 0).any() and (q.d != 0).any(), name
        if name in ("q4_k", "q6_k"):
            scales = q.scales.float() * q.d.float().unsqueeze(-1)
            assert (scales == 0).any() and (q.d != 0).unsqueeze(-1).expand_as(scales)[scales == 0].any(), name


def test_seq_sum_is_sequential():
    """``_seq_sum`` (``index_add_`` on CPU) is the left-to-right fp32 chain, bit for bit, also with 2 threads."""
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for shape in [(32, 7), (32, 3, 5000), (16, 40000), (31, 2, 3000)]:
                t = torch.randn(shape, generator=g) * torch.logspace(-10, 10, shape[0]).view(-1, *[1] * (len(shape) - 1))
                t[3] = -t[1]  # cancellations make any reordering visible
                t[0, :3] = -0.0
                for from_zero in (True, False):
                    for terms in (t, t[..., ::2]):
                        a = kq._seq_sum(terms, from_zero=from_zero)
                        b = kq._seq_sum_loop(terms, from_zero=from_zero)
                        assert torch.equal(_bits(a), _bits(b)), (nt, shape, from_zero)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", TYPES)
def test_pack_unpack_round_trip(data, name):
    quantize, dequantize, fake_quantize, pack, unpack = fns(name)
    x = torch.from_numpy(data[name][:64])
    q = quantize(x)
    raw = pack(q)
    back = unpack(raw, x.shape[1])
    for field in ("codes", "d", "scales", "mins", "dmin"):
        if hasattr(q, field):
            a, b = getattr(q, field), getattr(back, field)
            assert a.dtype == b.dtype and torch.equal(_bits16(a), _bits16(b)), field
    assert np.array_equal(pack(back), raw)
    assert np.array_equal(unpack(raw.tobytes(), x.shape[1]).codes.numpy(), q.codes.numpy())
    assert torch.equal(dequantize(back), fake_quantize(x))


def _bits16(t):
    return t.view(torch.int16) if t.dtype == torch.float16 else t


@pytest.mark.parametrize("name", TYPES)
def test_stored_ranges(data, name):
    q = fns(name)[0](torch.from_numpy(data[name][:64]))
    lo, hi = {"q4_k": (0, 15), "q6_k": (0, 63), "q5_0": (0, 31), "q8_0": (-127, 127)}[name]
    assert q.codes.min() >= lo and q.codes.max() <= hi
    assert q.d.dtype == torch.float16
    if name == "q4_k":
        assert q.scales.max() <= 63 and q.mins.max() <= 63 and q.dmin.dtype == torch.float16
    if name == "q6_k":
        assert q.scales.dtype == torch.int8


@pytest.mark.parametrize("name", TYPES)
def test_bad_input_is_a_format_error(name):
    quantize, _, fake_quantize, _, unpack = fns(name)
    block = BLOCK[name]
    with pytest.raises(FormatError, match="multiple of"):
        quantize(torch.zeros(2, block + 16))
    with pytest.raises(FormatError, match="2-D"):
        fake_quantize(torch.zeros(block))
    bad = torch.zeros(1, block)
    bad[0, 3] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        quantize(bad)
    for big in (3e38, 2e9):  # x * x overflows fp32 (Q6_K) / the fp16 scale overflows (all four)
        with pytest.raises(FormatError, match="too large"):
            quantize(torch.full((1, block), big))
    with pytest.raises(FormatError):
        unpack(np.zeros(7, np.uint8), block)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", TYPES)
def test_cuda_matches_cpu(data, name):
    quantize, _, fake_quantize, pack, _ = fns(name)
    x = torch.from_numpy(data[name])
    assert np.array_equal(pack(quantize(x.cuda())), pack(quantize(x)))
    assert torch.equal(_bits(fake_quantize(x.cuda()).cpu()), _bits(fake_quantize(x)))
