"""sfp8: gemma.cpp's switched floating point (production encoder) with ``ScaleWeights``' per-tensor scale.

Truncate to 6 explicit mantissa bits, then round half to even to 3 (large) or 2 (small) bits; encoding a tensor is
a shift and a look-up in an exact table built from that rule.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from gemma3_qat.formats.base import FormatError, QuantizedWeight, as_fp32_matrix
from gemma3_qat.formats.weight_format import WeightFormat

T = GGMLQuantizationType
SFP_MAX = 1.875  # gemma.cpp SfpStream::kMax: the largest SFP magnitude


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2**exponent in fp32 for integer exponents in the normal range [-126, 127]."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def sfp8_scale(weight32: torch.Tensor) -> torch.Tensor:
    """gemma.cpp ``ScaleWeights``: 1 if max|w| <= 1.875, else max|w| / 1.875 (fp32). A 0-d fp32 tensor."""
    maxabs = torch.maximum(weight32.amax(), -weight32.amin()) if weight32.numel() else weight32.new_zeros(())
    return torch.where(maxabs <= SFP_MAX, torch.ones_like(maxabs), maxabs / SFP_MAX)


def sfp8_magnitudes(a: torch.Tensor) -> torch.Tensor:
    """The production encoder on magnitudes ``a`` in [0, 1.875]: returns the representable magnitude ``r``."""
    # gemma.cpp truncates f32 -> bf16 and then drops one more mantissa bit: keep 6 explicit mantissa bits.
    a6 = (a.view(torch.int32) & -131072).view(torch.float32)  # 0xFFFE0000 as a signed int32
    _, ex = torch.frexp(a6)  # a6 = f * 2**ex, f in [0.5, 1)
    e = (ex - 1).clamp_(min=-30)  # below 2**-30 everything flushes to zero anyway; keeps _pow2 in range
    mbits = torch.where(a6 >= 2.0**-7, 3, 2)
    r = torch.round(a6 * _pow2(mbits - e)) * _pow2(e - mbits)  # round half to even; exact power-of-2 scaling
    r = torch.where(r < 2.0**-23, torch.zeros_like(r), r)  # underflow flushes to zero
    r = torch.where(r == 2.0**-23, torch.full_like(r, 1.25 * 2.0**-23), r)  # mantissa 0 at E=0 is the zero code
    return r


def sfp8_codes(r: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """SFP byte of representable magnitudes ``r`` with the sign of ``negative`` (zero is always code 0)."""
    _, ex = torch.frexp(r)
    e = ex - 1
    frac = r * _pow2(-e.clamp(min=-126))  # in [1, 2)
    large = r >= 2.0**-7
    code_large = 0x40 | ((e + 15 - 8) << 3) | (frac * 8 - 8).to(torch.int32)
    code_small = ((e + 23) << 2) | (frac * 4 - 4).to(torch.int32)
    code = torch.where(large, code_large, code_small)
    code = torch.where(r == 0, torch.zeros_like(code), code)
    code = torch.where(negative & (r != 0), code | 0x80, code)
    return code.to(torch.uint8)


def _sfp8_decode_table() -> torch.Tensor:
    table = torch.zeros(256, dtype=torch.float32)
    for code in range(256):
        mag = code & 0x7F
        if mag == 0:
            continue  # zero, and the reserved "-0" code 0x80
        if mag & 0x40:
            value = (1 + (mag & 7) / 8) * 2.0 ** (((mag >> 3) & 7) + 8 - 15)
        else:
            value = (1 + (mag & 3) / 4) * 2.0 ** ((mag >> 2) - 23)
        table[code] = -value if code & 0x80 else value
    return table


SFP8_DECODE_TABLE = _sfp8_decode_table()  # code -> value at scale 1 (255 distinct values)

# The production encoder reads only the top 15 bits of an f32 (sign, exponent, 6 mantissa bits: it truncates
# first), so the rule above, run once on each of the 32,768 truncated inputs, tabulates it exactly. Encoding a
# tensor is then a shift and a table look-up.
_SFP8_INDEX_SHIFT = 17


def _sfp8_tables() -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.arange(1 << 15, dtype=torch.int32) << _SFP8_INDEX_SHIFT).view(torch.float32)
    a = torch.where(x.abs() <= SFP_MAX, x.abs(), torch.zeros_like(x))  # inputs are clamped to 1.875 first
    r = sfp8_magnitudes(a)
    negative = torch.signbit(x)
    values = torch.where(negative & (r != 0), -r, r)  # never -0
    return values, sfp8_codes(r, negative)


_SFP8_VALUE_OF_INDEX, _SFP8_CODE_OF_INDEX = _sfp8_tables()
_tables_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _sfp8_tables_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _tables_by_device:
        _tables_by_device[device] = (_SFP8_VALUE_OF_INDEX.to(device), _SFP8_CODE_OF_INDEX.to(device))
    return _tables_by_device[device]


def sfp8_values_fit_bf16(scale: torch.Tensor) -> bool:
    """Whether ``r * scale`` is exact in bf16 for every SFP magnitude ``r`` (4 significant bits): true when the
    scale has at most 4 significant bits, e.g. 1 or a power of two."""
    return int(scale.to(torch.float32).view(torch.int32)) & 0xFFFFF == 0


def _sfp8_index(weight32: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per weight, the table index of its scaled, clamped value (int32, one fresh buffer); and the scale.

    ``scale``: the tensor's ``ScaleWeights`` scale when ``weight32`` is only a chunk of rows of it.
    """
    s = sfp8_scale(weight32) if scale is None else scale
    if bool(s == 1):  # max|w| <= 1.875: no scaling
        v = weight32.clone()
    else:
        inv = (1.0 / s.double()).float()  # gemma.cpp: float(1.0 / double(scale))
        v = torch.mul(weight32, inv).clamp_(-SFP_MAX, SFP_MAX)  # min(1.875, |w * inv|), sign kept
    index = v.view(torch.int32)
    index >>= _SFP8_INDEX_SHIFT  # arithmetic shift keeps the sign bit: mask it back to 15 bits
    index &= (1 << 15) - 1
    return index, s



class SFP8(WeightFormat):
    name = "sfp8"
    summary = "switched floating point, 1 byte per weight + 1 scale per tensor (gemma.cpp SFP)"
    runtimes = "gemma.cpp (SFP), safetensors codes + scale; GGUF as exact BF16/F32 values (no SFP type)"
    code_bits = 8  # plus one fp32 scale per tensor
    code_name = "sfp8"
    scale_dtype = torch.float32
    granularity = "tensor"
    gguf_exact = (T.BF16, T.F32)  # GGUF has no SFP type: BF16 where the tensor scale allows it, else F32
    gguf_lossy = T.Q8_0
    gguf_caveat = ("GGUF has no SFP type: sfp8 weights are written as their exact values (BF16 where the tensor "
                   "scale allows, else F32); --lossy writes Q8_0 instead")
    safetensors_codes = True
    safetensors_metadata = {
        "format": "gemma3-qat-sfp8", "encoding": "gemma.cpp switched floating point (SFP): per weight one byte, bit "
        "7 sign; bit 6 = 1: (1 + m/8) * 2^(E-15), E = bits 6..3 + 8, m = bits 2..0; bit 6 = 0: (1 + m/4) * 2^(E-23), "
        "E = bits 5..2, m = bits 1..0; magnitude 0 = zero; value = decoded * scale"}

    def _index(self, weight: torch.Tensor, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_shape(tuple(weight.shape))
        return _sfp8_index(as_fp32_matrix(weight), scale)

    def quantize(self, weight, scale: torch.Tensor | None = None):
        """``scale``: the whole tensor's scale, when ``weight`` is a chunk of its rows."""
        index, s = self._index(weight, scale)
        codes = _sfp8_tables_on(index.device)[1]
        return QuantizedWeight(self.name, torch.index_select(codes, 0, index.view(-1)).view(index.shape), s)

    def dequantize(self, qw):
        return SFP8_DECODE_TABLE.to(qw.codes.device)[qw.codes.long()] * qw.scales

    def fake_quantize_values(self, weight, scale: torch.Tensor | None = None):
        """``scale``: the whole tensor's scale, when ``weight`` is a chunk of its rows."""
        index, s = self._index(weight, scale)
        values = _sfp8_tables_on(index.device)[0]
        out = torch.empty(index.shape, dtype=torch.float32, device=index.device)
        torch.index_select(values, 0, index.view(-1), out=out.view(-1))
        return out.mul_(s)

    def tensor_scale(self, maxabs):
        return sfp8_scale(maxabs.reshape(1, 1))

    def gguf_ggml_type(self, *, lossy=False, tensor_scale=None):
        if lossy:
            return super().gguf_ggml_type(lossy=True)
        # exact values: BF16 when the tensor's scale has at most 4 significant bits (scale 1 whenever
        # max|w| <= 1.875, the usual case and the prediction without weights), else F32
        return T.BF16 if tensor_scale is None or sfp8_values_fit_bf16(tensor_scale) else T.F32

    def gguf_encode(self, rows, ggml_type, tensor_scale=None):
        if ggml_type == T.BF16:  # the values are bf16 values: their top 16 bits, faster than gguf's numpy rule
            values = self.fake_quantize_values(rows, tensor_scale)
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return super().gguf_encode(rows, ggml_type, tensor_scale)

    def gguf_note(self, *, lossy=False):
        return None if lossy else self.gguf_caveat

    def check_value_dtype(self, dtype):
        if dtype == torch.float16:
            raise FormatError("f16 cannot hold SFP8's smallest values (below fp16's subnormal step); use f32")


