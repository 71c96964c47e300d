"""The formats against independent references: the gguf package's Q4_0 (a port of ggml's C reference) and
gemma.cpp's SFP8 vectors (the llama.cpp lattices q4_k ... q8_0-lattice are checked against ggml's C in
tests/test_kquants.py; here, what every format shares). Comparisons are exact (bit patterns), never approximate."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gemma3_qat.formats import (
    FORMATS, SFP8_DECODE_TABLE, FormatError, fake_quantize, get_format, lattice_formats, q4_0_blocks,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
BLOCK, CHANNEL, SFP = FORMATS["int4-block"], FORMATS["int4-channel"], FORMATS["sfp8"]
LATTICES = sorted(lattice_formats())  # every format with numerics of its own (not the mixtures)
# ggml's Q4_K and Q6_K searches are not idempotent on their own lattice: re-quantizing the dequantized values can
# pick another (scale, min) or sub-block scale (tests/test_kquant_export.py measures how often)
IDEMPOTENT = [n for n in LATTICES if n not in ("q4_k", "q6_k")]


def cols(name: str, n: int) -> int:
    """``n`` columns, or the format's block where that is larger (Q4_K, Q6_K: 256)."""
    return max(n, getattr(get_format(name), "block", 1))


def bits(x) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a.astype(np.float32).view(np.uint32)


def gguf_q4_0(w: torch.Tensor) -> np.ndarray:
    return gq.quantize(w.numpy(), GT.Q4_0)


def adversarial_blocks(rng: np.random.Generator) -> np.ndarray:
    """Rows of 32: exact +a/-a ties (first occurrence wins), all zero, fp16-denormal scales, one-hot, ramps."""
    rows = []
    tie = rng.normal(size=32).astype(np.float32) * 0.1
    tie[7], tie[20] = 0.5, -0.5  # the first extreme is positive
    rows.append(tie)
    rows.append(-tie)  # the first extreme is negative
    rows.append(np.zeros(32, np.float32))
    rows.append(np.float32(1e-6) * rng.normal(size=32).astype(np.float32))  # fp16(d) subnormal, nonzero
    rows.append(np.float32(3e-7) * rng.normal(size=32).astype(np.float32))  # near the fp16 subnormal floor
    one_hot = np.zeros(32, np.float32)
    one_hot[31] = -3.0
    rows.append(one_hot)
    rows.append(np.linspace(-1, 1, 32, dtype=np.float32))
    rows.append(np.linspace(1, -1, 32, dtype=np.float32))
    rows.append(np.full(32, 0.25, np.float32))
    halfway = np.arange(32, dtype=np.float32) - 16  # many values land exactly on x*id + 8.5 ties
    rows.append(halfway)
    rows.append(halfway / np.float32(7))
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------- int4-block = Q4_0


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "adversarial", "bf16_weights", "large_rows"])
def test_int4_block_bytes_equal_gguf_q4_0(kind):
    rng = np.random.default_rng(0)
    if kind == "gaussian":
        w = rng.normal(scale=0.02, size=(64, 512))
    elif kind == "outliers":
        w = rng.standard_t(df=2, size=(64, 512)) * 0.02  # heavy tails
        w[rng.random(w.shape) < 0.01] *= 50
    elif kind == "adversarial":
        w = np.tile(adversarial_blocks(rng), (1, 4))
    elif kind == "bf16_weights":
        w = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float().numpy()
    else:
        w = rng.normal(scale=300.0, size=(8, 2048))
    w = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    ours = q4_0_blocks(BLOCK.quantize(w))
    ref = gguf_q4_0(w)
    scale_zero = ref.reshape(-1, 18)[:, :2].view(np.float16).ravel() == 0
    # Where fp16(d) underflows to 0 our codes are the canonical 8 (the value is 0 either way); elsewhere: every byte.
    np.testing.assert_array_equal(ours.reshape(-1, 18)[~scale_zero], ref.reshape(-1, 18)[~scale_zero])
    np.testing.assert_array_equal(bits(BLOCK.fake_quantize_values(w)), bits(gq.dequantize(ref, GT.Q4_0)))


def test_int4_block_scale_underflow_and_zero_blocks_are_defined():
    w = torch.zeros(2, 32)
    w[1] = torch.linspace(-1e-8, 1e-8, 32)  # |d| ~ 1.25e-9: fp16(d) underflows to 0
    qw = BLOCK.quantize(w)
    assert torch.all(qw.scales == 0)
    assert torch.all(qw.codes == 8)
    assert torch.all(BLOCK.dequantize(qw) == 0)
    # the all-zero block stores -0.0 as its scale, as ggml does (d = 0 / -8)
    assert q4_0_blocks(qw)[0, :2].tobytes() == gguf_q4_0(w)[0, :2].tobytes()


def test_int4_fp32_subnormal_extreme_gives_zero_not_nan():
    w = torch.zeros(1, 64)
    w[0, 0] = 5.6e-40  # d is an fp32 subnormal: 1/d would overflow to inf, and 0 * inf is NaN
    w[0, 40] = -1e-45
    for fmt in (BLOCK, CHANNEL):
        qw = fmt.quantize(w)
        assert torch.all(qw.codes == 8) and torch.all(qw.scales == 0)
        assert torch.equal(fmt.fake_quantize_values(w), torch.zeros_like(w))


def test_int4_too_large_for_fp16_is_a_clear_error():
    w = torch.zeros(1, 32)
    w[0, 3] = 1e6  # d = -125000 overflows fp16
    for fmt in (BLOCK, CHANNEL):
        with pytest.raises(FormatError, match="too large for an fp16"):
            fmt.quantize(w)


def test_int4_block_needs_multiple_of_32():
    with pytest.raises(FormatError, match="multiple of 32"):
        BLOCK.quantize(torch.zeros(4, 40))


# ---------------------------------------------------------------------------------------------- int4-channel


def test_int4_channel_is_q4_0_rule_over_rows():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    w[5, 17] = -2.0  # a negative row extreme
    qw = CHANNEL.quantize(w)
    assert qw.scales.shape == (48, 1) and qw.scales.dtype == torch.float16
    k = qw.codes.to(torch.int16) - 8
    assert int(k.min()) >= -8 and int(k.max()) <= 7
    extreme = w.abs().argmax(dim=1)
    assert torch.all(k[torch.arange(48), extreme] == -8)  # the row's signed extreme is always k = -8
    values = CHANNEL.fake_quantize_values(w)
    assert torch.equal(values, k.float() * qw.scales.float())
    # the same rule as Q4_0 with one block per row: compare with gguf's Q4_0 on a 32-wide row
    row = w[:, :32].contiguous()
    assert np.array_equal(q4_0_blocks(CHANNEL.quantize(row)), gguf_q4_0(row))
    # GGUF representation: every block of a row carries the row scale, and dequantizes exactly
    blocks = q4_0_blocks(qw)
    assert np.array_equal(bits(gq.dequantize(blocks, GT.Q4_0)), bits(values))


# ---------------------------------------------------------------------------------------------- sfp8


def test_sfp8_reproduces_gemma_cpp_vectors():
    v = np.load(SHARED / "vectors" / "sfp8.npz")
    x = torch.from_numpy(v["x"]).reshape(1, -1)
    # scale 1 path (|x| <= 1.875): values and codes of the production encoder
    assert float(x.abs().max()) <= 1.875
    qw = SFP.quantize(x)
    assert float(qw.scales) == 1.0
    np.testing.assert_array_equal(qw.codes.numpy().ravel(), v["codes"])
    np.testing.assert_array_equal(bits(SFP.fake_quantize_values(x)).ravel(), v["y"].view(np.uint32))
    np.testing.assert_array_equal(bits(SFP.dequantize(qw)).ravel(), v["y"].view(np.uint32))
    for i, scale in enumerate(v["tensor_scales"]):
        t = torch.from_numpy(v[f"tensor{i}"]).reshape(1, -1)
        qt = SFP.quantize(t)
        assert bits(qt.scales) == bits(np.float32(scale))
        np.testing.assert_array_equal(bits(SFP.fake_quantize_values(t)).ravel(), v[f"tensor{i}_fq"].view(np.uint32))
        np.testing.assert_array_equal(bits(SFP.dequantize(qt)).ravel(), v[f"tensor{i}_fq"].view(np.uint32))


@pytest.mark.parametrize("scale", [1e-9, 1e-4, 0.05, 1.0, 1.8, 40.0])
def test_sfp8_table_encoder_equals_the_rule_written_out(scale):
    """The fast path (shift + table) against the spec's rule applied directly, scaling included."""
    from gemma3_qat.formats.sfp8 import sfp8_codes, sfp8_magnitudes, sfp8_scale

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(7)) * scale
    s = sfp8_scale(w)
    a = w.abs() if s == 1 else (w * (1.0 / s.double()).float()).abs().clamp(max=1.875)
    r = sfp8_magnitudes(a)
    want = torch.where((w < 0) & (r != 0), -r, r) * s
    np.testing.assert_array_equal(bits(SFP.fake_quantize_values(w)), bits(want))
    assert torch.equal(SFP.quantize(w).codes, sfp8_codes(r, w < 0))


def test_sfp8_code_space():
    values = SFP8_DECODE_TABLE
    assert values[0] == 0 and values[0x80] == 0  # -0 is reserved
    assert len(set(values.tolist())) == 255
    assert float(values.abs().max()) == 1.875
    assert float(values[values > 0].min()) == 1.25 * 2.0**-23
    assert torch.equal(values, values.to(torch.bfloat16).float())  # every value is exact in bf16
    # every nonzero code encodes back to itself
    codes = torch.tensor([c for c in range(256) if c & 0x7F], dtype=torch.uint8)
    qw = SFP.quantize(SFP8_DECODE_TABLE[codes.long()].reshape(1, -1))
    assert torch.equal(qw.codes.ravel(), codes)


def test_sfp8_never_negative_zero():
    w = torch.tensor([[-1e-30, -0.0, 1e-30, -1.0]])
    qw = SFP.quantize(w)
    assert qw.codes.tolist()[0][:3] == [0, 0, 0]
    assert not torch.signbit(SFP.fake_quantize_values(w)[0, :3]).any()


# ---------------------------------------------------------------------------------------------- properties

weights = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
    elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=True, width=32),
)


@settings(max_examples=200, deadline=None)
@given(w=weights, name=st.sampled_from(IDEMPOTENT))
def test_quantize_dequantize_is_idempotent(w, name):
    fmt = get_format(name)
    x = torch.from_numpy(w)
    once = fmt.fake_quantize_values(x)
    twice = fmt.fake_quantize_values(once)
    # numerically equal (an all-zero int4 block dequantizes to -0.0 as in ggml, then to +0.0), and the same codes
    np.testing.assert_array_equal(once.numpy(), twice.numpy())
    assert torch.equal(fmt.quantize(once).codes, fmt.quantize(twice).codes)


@settings(max_examples=300, deadline=None)
@given(w=weights, dtype=st.sampled_from(["f32", "f16"]))
def test_int4_block_requantizes_to_identical_bytes_in_gguf(w, dtype):
    """Our int4-block weights handed to llama.cpp's Q4_0 quantizer as F32 or F16 give the same bytes back,
    wherever the block's stored scale is a normal fp16 number."""
    x = torch.from_numpy(w)
    qw = BLOCK.quantize(x)
    handed = BLOCK.dequantize(qw).numpy()
    if dtype == "f16":
        handed = handed.astype(np.float16).astype(np.float32)
    requant = gguf_q4_0(torch.from_numpy(handed)).reshape(-1, 18)
    ours = q4_0_blocks(qw).reshape(-1, 18)
    scale = np.abs(ours[:, :2].copy().view(np.float16).ravel().astype(np.float32))
    normal = scale >= np.float32(6.103515625e-05)  # smallest normal fp16
    np.testing.assert_array_equal(requant[normal], ours[normal])


# ---------------------------------------------------------------------------------------------- STE, devices


@pytest.mark.parametrize("name", LATTICES)
def test_straight_through_gradient_is_identity(name):
    w = (torch.randn(8, cols(name, 64)) * 3).requires_grad_()
    g = torch.randn(8, cols(name, 64))
    out = fake_quantize(w, name)
    assert torch.equal(out.detach(), get_format(name).fake_quantize_values(w))
    out.backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("name", LATTICES)
def test_math_is_fp32_whatever_the_weight_dtype(name):
    w = torch.randn(4, cols(name, 64)).to(torch.bfloat16)
    fmt = get_format(name)
    assert torch.equal(fmt.quantize(w).codes, fmt.quantize(w.float()).codes)
    assert fake_quantize(w, name).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", LATTICES)
def test_cuda_matches_cpu_bit_for_bit(name):
    w = torch.randn(256, 1024) * 0.05
    fmt = get_format(name)
    cpu, gpu = fmt.quantize(w), fmt.quantize(w.cuda())
    assert torch.equal(cpu.codes, gpu.codes.cpu()) and torch.equal(cpu.scales, gpu.scales.cpu())
    assert np.array_equal(bits(fmt.fake_quantize_values(w)), bits(fmt.fake_quantize_values(w.cuda())))


def test_unknown_format_names_the_valid_ones():
    with pytest.raises(FormatError, match="int4-block, int4-channel, sfp8"):
        get_format("q4_0")


# ---------------------------------------------------------------------------------------------- container facts


def test_container_facts_come_from_the_format_and_ggml_sizes():
    from gguf import GGML_QUANT_SIZES

    from gemma3_qat import formats

    assert (formats.Q4_0_BLOCK, formats.Q4_0_BLOCK_BYTES) == GGML_QUANT_SIZES[GT.Q4_0] == (32, 18)
    assert [FORMATS[n].bits_per_weight for n in ("int4-block", "int4-channel", "sfp8")] == [4.5, 4.0, 8.0]
    shape = (48, 256)
    # compact: int4-block = Q4_0's 18 bytes per 32; int4-channel 4 bits + fp16 per row; sfp8 1 byte + fp32 scale
    assert BLOCK.compact_bytes(shape) == 48 * 256 // 32 * 18
    assert CHANNEL.compact_bytes(shape) == 48 * 256 // 2 + 2 * 48
    assert SFP.compact_bytes(shape) == 48 * 256 + 4
    assert [f.compact_label for f in (BLOCK, CHANNEL, SFP)] == ["int4+fp16/32", "int4+fp16/row", "sfp8+fp32/tensor"]
    w = torch.randn(shape)
    for f in (BLOCK, CHANNEL, SFP):  # the scales quantize returns are the ones the container counts
        assert tuple(f.quantize(w).scales.shape) == f.scale_shape(shape), f.name
    assert BLOCK.compressed_tensors_scheme()["strategy"] == "group"
    assert BLOCK.compressed_tensors_scheme()["group_size"] == 32
    assert CHANNEL.compressed_tensors_scheme()["strategy"] == "channel" and SFP.compressed_tensors_scheme() is None
    assert [f.gguf_type for f in (BLOCK, CHANNEL, SFP)] == ["Q4_0", "Q4_0", "BF16/F32 (exact values) or Q8_0 (lossy)"]
    with pytest.raises(FormatError, match="no lossy GGUF type"):
        BLOCK.gguf_ggml_type(lossy=True)


@pytest.mark.parametrize("name", LATTICES)
def test_gguf_encoding_holds_the_fake_quant_values_bit_for_bit(name):
    fmt = get_format(name)
    w = torch.randn(16, cols(name, 128)) * 0.05
    scale = fmt.tensor_scale(w.abs().amax()) if fmt.granularity == "tensor" else None
    enc = fmt.gguf_encoding(tensor_scale=scale)
    assert enc.ggml_type == fmt.gguf_exact[0]
    data = enc.encode(w)
    got = data if enc.ggml_type == GT.F32 else gq.dequantize(np.ascontiguousarray(data).view(np.uint8),
                                                             enc.ggml_type)
    want = fmt.fake_quantize_values(w)
    assert np.array_equal(bits(got.reshape(w.shape)), bits(want))
    if fmt.gguf_lossy is not None:  # lossy: the reference rule of that type over the exact values
        lossy = fmt.gguf_encoding(lossy=True, tensor_scale=scale)
        assert np.array_equal(lossy.encode(w), gq.quantize(want.numpy(), fmt.gguf_lossy))
    # a scale that bf16 cannot carry keeps the exact values in the next exact type
    if len(fmt.gguf_exact) > 1:
        big = fmt.gguf_encoding(tensor_scale=torch.tensor(1.3))
        assert big.ggml_type == fmt.gguf_exact[1]


def test_llama_cpp_lattices_are_formats_with_their_container_facts():
    from gemma3_qat.formats import lattice_of_type
    from gemma3_qat.layout import PLAIN_TYPES

    assert not set(FORMATS) & set(PLAIN_TYPES)  # no name means two things to export --type / memory --format
    want = {"q4_k": (GT.Q4_K, 4.5, 256, 144), "q6_k": (GT.Q6_K, 6.5625, 256, 210), "q5_0": (GT.Q5_0, 5.5, 32, 22),
            "q8_0-lattice": (GT.Q8_0, 8.5, 32, 34)}
    w = torch.randn(3, 512) * 0.02
    for name, (ggml, bpw, block, nbytes) in want.items():
        f = FORMATS[name]
        assert lattice_of_type(ggml) is f and f.gguf_exact == (ggml,) and f.gguf_type == ggml.name
        assert (f.bits_per_weight, f.block, f.compact_label) == (bpw, block, ggml.name)
        assert f.compact_bytes((3, 512)) == 3 * 512 // block * nbytes  # the compact container: ggml's blocks
        assert f.compressed_tensors_scheme() is None and not f.safetensors_codes and f.gguf_lossy is None
        qw = f.quantize(w)
        assert tuple(qw.scales.shape) == f.scale_shape((3, 512)) and qw.scales.dtype == torch.float16
        assert torch.equal(f.dequantize(qw), f.fake_quantize_values(w))
        if ggml == GT.Q8_0:  # the gguf package's own Q8_0 rule agrees
            assert np.array_equal(f.gguf_encode(w, ggml).reshape(-1), gq.quantize(w.numpy(), ggml).reshape(-1))
    with pytest.raises(FormatError, match=r"q4_k needs rows that are a multiple of 256 .*q4_k_m"):
        FORMATS["q4_k"].fake_quantize_values(torch.randn(4, 640))
    with pytest.raises(FormatError, match="q5_0 needs rows that are a multiple of 32"):
        FORMATS["q5_0"].check_shape((4, 48))


def test_a_mixture_is_named_but_has_no_numerics_of_its_own():
    q4km = get_format("q4_k_m")
    assert q4km.is_mixture and q4km.bits_range == (4.5, 8.5) and "Q4_K_M" in q4km.gguf_type
    assert all(not get_format(n).is_mixture for n in q4km.lattices)
    with pytest.raises(FormatError, match="q4_k_m is a mixture: each tensor has its own lattice"):
        fake_quantize(torch.randn(4, 256), "q4_k_m")
    assert "q4_k_m" not in lattice_formats()
