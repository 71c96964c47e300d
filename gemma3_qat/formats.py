"""The three QAT weight formats: their numerics (the single source of truth) and their container facts.

Both the fake-quantizer (training) and the exporters call these functions, which is what makes an export
bit-exact with the weights the student was trained with. The rules are ported from the runtimes, see
``shared/specs/formats.md``:

* ``int4-block``   llama.cpp Q4_0 (``quantize_row_q4_0_ref``): blocks of 32 consecutive input features of one
                   output row, scale from the SIGNED extreme ``d = m / -8``, codes from the unrounded fp32
                   reciprocal ``q = min(15, trunc(x * (1/d) + 8.5))``, stored scale ``fp16(d)``.
* ``int4-channel`` the same rule with the block = the whole row (one fp16 scale per output channel).
* ``sfp8``         gemma.cpp switched floating point, production encoder (truncate to 6 explicit mantissa bits,
                   then round half to even to 3 (large) or 2 (small) bits), with ``ScaleWeights``' per-tensor scale.

All math is fp32 whatever the weight's dtype, vectorised torch, on the weight's own device (CPU or CUDA).
A weight is a 2-D ``[out, in]`` tensor as ``nn.Linear`` and ``nn.Embedding`` hold it.

Each format also owns the facts of the containers it is stored in, so that the exporters and the memory model
ask the format object instead of re-deriving them from its name: its compact container (code bits, scale dtype
and granularity -> ``compact_bytes``), its GGUF encoding (``gguf_ggml_type`` / ``gguf_encoding``), its
compressed-tensors scheme and whether its codes are a safetensors layout of their own. Adding a format is one
class here (see ``tests/test_layout.py``, which registers a throwaway int8 format and exports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from gemma3_qat.errors import InputError

__all__ = [
    "FormatError",
    "QuantizedWeight",
    "GGUFEncoding",
    "WeightFormat",
    "Int4Block",
    "Int4Channel",
    "SFP8",
    "FORMATS",
    "get_format",
    "fake_quantize",
    "q4_0_blocks",
    "encode_values",
    "SFP8_DECODE_TABLE",
]

T = GGMLQuantizationType
Q4_0_BLOCK, Q4_0_BLOCK_BYTES = GGML_QUANT_SIZES[T.Q4_0]  # 32 weights per block, fp16 scale + 16 bytes of nibbles
SFP_MAX = 1.875  # gemma.cpp SfpStream::kMax: the largest SFP magnitude
FP16_MAX = 65504.0


class FormatError(InputError):
    """A weight that a format cannot represent (bad shape, non-finite, out of range)."""


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as the runtime stores it.

    ``codes``:  int4 formats: uint8 ``q`` in [0, 15] per weight, shape ``[out, in]`` (value ``(q - 8) * scale``);
                sfp8: the SFP byte per weight, shape ``[out, in]``.
    ``scales``: int4-block: fp16 ``[out, in // 32]``; int4-channel: fp16 ``[out, 1]``; sfp8: fp32 scalar (the
                ``ScaleWeights`` per-tensor scale).
    """

    format: str
    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def _as_fp32_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise FormatError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# int4: the Q4_0 rule over blocks
# --------------------------------------------------------------------------------------------------------------


def _signed_extreme(blocks: torch.Tensor) -> torch.Tensor:
    """``x[i]`` for the FIRST ``i`` with the largest ``|x|`` of each block (ggml keeps the first it meets)."""
    hi = blocks.amax(dim=-1, keepdim=True)
    lo = blocks.amin(dim=-1, keepdim=True)
    m = torch.where(hi > -lo, hi, lo)
    tie = (hi == -lo).squeeze(-1)  # +a and -a both present, or an all-zero block: the first occurrence decides
    if tie.any():
        tied = blocks[tie]
        m[tie] = torch.gather(tied, -1, tied.abs().argmax(dim=-1, keepdim=True))  # argmax: first occurrence
    return m


def _extreme_position(blocks: torch.Tensor, extreme: torch.Tensor) -> torch.Tensor:
    """Index ``[..., 1]`` of the first element equal to its block's signed extreme: the one the rule read."""
    return (blocks == extreme).to(torch.uint8).argmax(dim=-1, keepdim=True)


def _q4_0_scale(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's scale of each block (last axis): (reciprocal of the unrounded fp32 ``d``, stored ``fp16(d)``)."""
    return _q4_0_extreme_and_scale(blocks)[1:]


def _q4_0_extreme_and_scale(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(m, 1/d, fp16(d))`` of each block: its signed extreme ``m`` (which sets ``d = m / -8``) and the scale."""
    m = _signed_extreme(blocks)
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


def _q4_0_q(blocks: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Q4_0's codes ``q = min(15, trunc(x * inv + 8.5))`` as fp32 in [0, 15], in one fresh buffer.

    The multiply and the add are separate operations (eager torch never fuses them into an FMA). The chain works
    in place: on CPU a fresh full-size buffer costs more than an elementwise pass.
    """
    return torch.mul(blocks, inv).add_(8.5).trunc_().clamp_(0, 15)


def _int4_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantize codes ``q`` in [0, 15] with fp16 scales broadcast over the last axis: ``(q - 8) * D`` in fp32."""
    return (q.to(torch.float32) - 8.0) * scale.to(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# SFP8: gemma.cpp's switched floating point
# --------------------------------------------------------------------------------------------------------------


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2**exponent in fp32 for integer exponents in the normal range [-126, 127]."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def sfp8_scale(weight32: torch.Tensor) -> torch.Tensor:
    """gemma.cpp ``ScaleWeights``: 1 if max|w| <= 1.875, else max|w| / 1.875 (fp32). A 0-d fp32 tensor."""
    maxabs = torch.maximum(weight32.amax(), -weight32.amin()) if weight32.numel() else weight32.new_zeros(())
    return torch.where(maxabs <= SFP_MAX, torch.ones_like(maxabs), maxabs / SFP_MAX)


def _sfp8_magnitudes(a: torch.Tensor) -> torch.Tensor:
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


def _sfp8_codes(r: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
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
    r = _sfp8_magnitudes(a)
    negative = torch.signbit(x)
    values = torch.where(negative & (r != 0), -r, r)  # never -0
    return values, _sfp8_codes(r, negative)


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


# --------------------------------------------------------------------------------------------------------------
# The formats
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFEncoding:
    """How one trained tensor goes into a GGUF file: its GGML type and the encoder of its row chunks."""

    ggml_type: GGMLQuantizationType
    encode: Callable[[torch.Tensor], np.ndarray]  # fp32 rows chunk -> bytes (or values) in ggml_type's layout
    note: str  # what the export plan says about the tensor


class WeightFormat:
    """One QAT weight format: quantize -> codes + scales, dequantize, the fake-quantized values, and its containers.

    A subclass sets the class attributes below and writes ``quantize`` / ``dequantize`` (and, where it is not the
    default ``values -> GGUF type``, ``gguf_encode``); everything else the exporters and the memory model need is
    derived here from those attributes.
    """

    name: str = ""
    summary: str = ""
    runtimes: str = ""
    # the compact container (the format's own home: compressed-tensors, gemma.cpp): codes + scales
    code_bits: int = 0  # bits per code
    code_name: str = ""  # the codes' kind in a storage label, e.g. int4
    scale_dtype: torch.dtype = torch.float16  # as stored
    granularity: int | str = "row"  # weights per scale along a row (an int), "row" or "tensor"
    # GGUF: the types that hold the trained values exactly (the first is the usual one), and the --lossy one
    gguf_exact: tuple[GGMLQuantizationType, ...] = ()
    gguf_lossy: GGMLQuantizationType | None = None
    gguf_caveat: str = ""  # said in the export plan and model card: how GGUF differs from the compact container
    safetensors_codes: bool = False  # its codes + scale are a safetensors layout of their own (named after it)
    safetensors_metadata: dict[str, str] = {}  # that layout's file metadata

    # ---------------------------------------------------------------------------------------------- numerics

    def check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2:
            raise FormatError(f"{self.name} quantizes 2-D [out, in] weights, got shape {tuple(shape)}")

    def quantize(self, weight: torch.Tensor) -> QuantizedWeight:
        raise NotImplementedError

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        raise NotImplementedError

    def fake_quantize_values(self, weight: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(weight))`` in fp32, computed without materialising the codes' storage."""
        return self.dequantize(self.quantize(weight))

    def scale_gradient(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """The gradient a scale derived from the weights passes back to the weight that sets it (see ``_Int4``);
        None for formats whose scale is not set by one weight."""
        return None

    def tensor_scale(self, maxabs: torch.Tensor) -> torch.Tensor:
        """The per-tensor scale from the tensor's max |w| (formats with ``granularity == "tensor"``)."""
        raise FormatError(f"{self.name} has no per-tensor scale")

    def _values(self, rows: torch.Tensor, tensor_scale: torch.Tensor | None) -> torch.Tensor:
        if tensor_scale is None:
            return self.fake_quantize_values(rows)
        return self.fake_quantize_values(rows, scale=tensor_scale)

    # ---------------------------------------------------------------------------------------------- compact

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight in the compact container, counting the scales of fixed-size blocks (int4-block: 4.5)
        but not one scale per row or tensor, whose share depends on the shape (see ``compact_bytes``)."""
        scale_bits = torch.finfo(self.scale_dtype).bits
        return self.code_bits + (scale_bits / self.granularity if isinstance(self.granularity, int) else 0.0)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scales of a weight of ``shape`` (as ``quantize`` returns them)."""
        out, n_in = shape[0], math.prod(shape[1:])
        if self.granularity == "tensor":
            return ()
        if self.granularity == "row":
            return (out, 1)
        if n_in % self.granularity:
            raise FormatError(f"{self.name} needs rows that are a multiple of {self.granularity}, got shape {shape}")
        return (out, n_in // self.granularity)

    def compact_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a weight of ``shape`` in the compact container: each row's codes packed to whole bytes, plus
        the scales."""
        out, n_in = shape[0], math.prod(shape[1:])
        scales = math.prod(self.scale_shape(shape))
        return out * math.ceil(n_in * self.code_bits / 8) + scales * torch.finfo(self.scale_dtype).bits // 8

    @property
    def compact_label(self) -> str:
        """How the memory report names the compact storage, e.g. ``int4+fp16/32``."""
        scale = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}[self.scale_dtype]
        return f"{self.code_name}+{scale}/{self.granularity}"

    def compressed_tensors_scheme(self) -> dict | None:
        """The compressed-tensors ``weights`` quantization args of the pack-quantized layout; None if it has none."""
        return None

    def check_value_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a storage dtype that cannot hold the format's values (the unquantized safetensors layout)."""

    # ---------------------------------------------------------------------------------------------- GGUF

    @property
    def gguf_type(self) -> str:
        """The GGUF types, in words (``gemma3-qat formats``)."""
        exact = "/".join(t.name for t in self.gguf_exact)
        if self.gguf_lossy is None:
            return exact
        return f"{exact} (exact values) or {self.gguf_lossy.name} (lossy)"

    def gguf_ggml_type(self, *, lossy: bool = False,
                       tensor_scale: torch.Tensor | None = None) -> GGMLQuantizationType:
        """The GGUF type of a trained tensor. ``tensor_scale``: the tensor's own scale where the choice depends
        on it; None predicts the usual case (the memory model, which has no weights)."""
        if lossy:
            if self.gguf_lossy is None:
                raise FormatError(f"{self.name} has no lossy GGUF type: it is written exactly as "
                                  f"{self.gguf_type}; drop --lossy")
            return self.gguf_lossy
        return self.gguf_exact[0]

    def gguf_encode(self, rows: torch.Tensor, ggml_type: GGMLQuantizationType,
                    tensor_scale: torch.Tensor | None = None) -> np.ndarray:
        """A chunk of rows of a trained tensor in ``ggml_type``'s layout. Default: the fake-quantized values,
        encoded by the runtime's own rule for that type (exact where the type holds them)."""
        return encode_values(self._values(rows, tensor_scale), ggml_type)

    def gguf_encoding(self, *, lossy: bool = False, tensor_scale: torch.Tensor | None = None) -> GGUFEncoding:
        ggml_type = self.gguf_ggml_type(lossy=lossy, tensor_scale=tensor_scale)
        note = (f"{self.name} codes" if tensor_scale is None
                else f"{self.name} values (scale {float(tensor_scale):.6g})")
        return GGUFEncoding(ggml_type, lambda rows: self.gguf_encode(rows, ggml_type, tensor_scale), note)

    def gguf_note(self, *, lossy: bool = False) -> str | None:
        """What the export plan says about the whole file (None: nothing to say)."""
        return self.gguf_caveat or None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Int4(WeightFormat):
    """int4 codes ``q = k + 8`` in [0, 15] with fp16 scales: Q4_0 in GGUF, pack-quantized in compressed-tensors."""

    code_bits = 4
    code_name = "int4"
    gguf_exact = (T.Q4_0,)

    def compressed_tensors_scheme(self):
        block = isinstance(self.granularity, int)
        return {"num_bits": self.code_bits, "type": "int", "symmetric": True, "dynamic": False,
                "observer": "minmax", "strategy": "group" if block else "channel",
                "group_size": self.granularity if block else None}

    def gguf_encode(self, rows, ggml_type, tensor_scale=None):
        if ggml_type != T.Q4_0:
            return super().gguf_encode(rows, ggml_type, tensor_scale)
        return q4_0_blocks(self.quantize(rows))  # the trained codes and scales, never re-derived

    def groups_of(self, weight: torch.Tensor) -> torch.Tensor:
        """``[rows, groups, group]`` fp32 view of the weight: the groups that share one scale."""
        raise NotImplementedError

    def extremes_of(self, weight: torch.Tensor) -> torch.Tensor:
        """``[rows, groups, 1]``: each group's signed extreme ``m``, the weight the rule's scale ``m / -8`` reads."""
        return _signed_extreme(self.groups_of(weight))

    def latent_for_scales(self, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``weight`` moved just enough that the runtime rule derives ``scales`` (``[rows, groups]``, fp16 values
        of the rule's sign, ``-sign(m)``; 0 keeps a group as it is): the group's extreme becomes ``-8 D``, weights
        beyond it on its side are clamped to ``8|D|`` and on the other side to ``7|D|`` (code 7's value). The
        dequantized values are round-to-nearest with scale ``D``, but for the extreme, which is always ``-8 D``
        (the rule has one code -8 per group). A scale search (``qat.ptq_init``) thus stays on the runtime's rule
        and exports stay exact. Returns ``[rows, in]``."""
        groups = self.groups_of(weight)
        D = scales.to(torch.float32).reshape(*groups.shape[:2], 1)
        keep = D == 0
        sign = torch.where(keep, torch.ones_like(D), -torch.sign(D))  # the extreme's side, made positive
        bound = 8.0 * D.abs()
        side = (groups * sign).clamp_(min=-7.0 * D.abs(), max=bound)
        side.scatter_(-1, _extreme_position(groups, _signed_extreme(groups)), bound)
        return torch.where(keep, groups, side * sign).reshape(weight.shape)

    def scale_gradient(self, weight, grad):
        """The learned-step-size (LSQ) gradient of each group's scale, delivered to the weight that sets it.

        The runtime rule ``D = fp16(m / -8)`` (``m`` the group's signed extreme) makes the scale a function of one
        latent weight, so a scale gradient needs no new parameter: with the rounding straight-through,
        ``d v_i / d D = q_i - w_i / D`` for ``v_i = q_i D`` (Esser et al., 2020), and ``d D / d m = -1/8``. The
        returned tensor holds ``-1/8 * sum_i grad_i (q_i - w_i / D)`` at each group's extreme, zeros elsewhere.
        The forward values, the export and the re-quantization of the latent weights by llama.cpp's own rule are
        unchanged: the scale is still the runtime's, it only learns where to be."""
        groups = self.groups_of(weight)
        g = grad.detach().to(torch.float32).reshape(groups.shape)
        extreme, inv, scale = _q4_0_extreme_and_scale(groups)
        q = _q4_0_q(groups, inv).sub_(8.0)
        D = scale.to(torch.float32)
        ratio = torch.where(D == 0, torch.zeros_like(groups), groups / torch.where(D == 0, torch.ones_like(D), D))
        grad_scale = (g * (q - ratio)).sum(dim=-1, keepdim=True)
        out = torch.zeros_like(groups)
        out.scatter_(-1, _extreme_position(groups, extreme), grad_scale / -8.0)
        return out.reshape(weight.shape).to(grad.dtype)


class Int4Block(_Int4):
    name = "int4-block"
    summary = "int4, one fp16 scale per 32 weights (llama.cpp Q4_0, bit-exact)"
    runtimes = "llama.cpp / Ollama / LM Studio (GGUF Q4_0), vLLM (compressed-tensors W4A16 group 32)"
    granularity = Q4_0_BLOCK  # 4 + 16/32 = 4.5 bits per weight: Q4_0's 18 bytes per 32

    def check_shape(self, shape):
        super().check_shape(shape)
        if shape[1] % Q4_0_BLOCK:
            raise FormatError(
                f"{self.name} needs the input dimension to be a multiple of {Q4_0_BLOCK}, got shape {tuple(shape)}; "
                "keep this tensor unquantized or use int4-channel"
            )

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        self.check_shape(tuple(weight.shape))
        w = _as_fp32_matrix(weight)
        return w.reshape(w.shape[0], w.shape[1] // Q4_0_BLOCK, Q4_0_BLOCK)

    groups_of = _blocks

    def quantize(self, weight):
        blocks = self._blocks(weight)
        inv, scale = _q4_0_scale(blocks)
        codes = _q4_0_q(blocks, inv).to(torch.uint8)
        return QuantizedWeight(self.name, codes.reshape(weight.shape), scale.squeeze(-1))

    def dequantize(self, qw):
        out, n = qw.codes.shape
        q = qw.codes.reshape(out, n // Q4_0_BLOCK, Q4_0_BLOCK)
        return _int4_values(q, qw.scales.unsqueeze(-1)).reshape(out, n)

    def fake_quantize_values(self, weight):
        blocks = self._blocks(weight)
        inv, scale = _q4_0_scale(blocks)
        return _q4_0_q(blocks, inv).sub_(8.0).mul_(scale.to(torch.float32)).reshape(weight.shape)


class Int4Channel(_Int4):
    name = "int4-channel"
    summary = "int4, one fp16 scale per output channel (Q4_0's rule over the whole row)"
    runtimes = "vLLM (compressed-tensors W4A16 channel), llama.cpp as Q4_0 with the row scale in every block"
    granularity = "row"  # 4 bits + one fp16 scale per row; GGUF stores it as Q4_0 (4.5)
    gguf_caveat = ("int4-channel is stored as Q4_0 with each row's scale in every block: exact, but 4.5 bits per "
                   "weight in GGUF (the 4-bit saving needs compressed-tensors or gemma.cpp)")

    def quantize(self, weight):
        self.check_shape(tuple(weight.shape))
        rows = _as_fp32_matrix(weight)
        inv, scale = _q4_0_scale(rows)
        return QuantizedWeight(self.name, _q4_0_q(rows, inv).to(torch.uint8), scale)

    def dequantize(self, qw):
        return _int4_values(qw.codes, qw.scales)

    def groups_of(self, weight):
        self.check_shape(tuple(weight.shape))
        return _as_fp32_matrix(weight).unsqueeze(1)  # one group: the row

    def fake_quantize_values(self, weight):
        self.check_shape(tuple(weight.shape))
        rows = _as_fp32_matrix(weight)
        inv, scale = _q4_0_scale(rows)
        return _q4_0_q(rows, inv).sub_(8.0).mul_(scale.to(torch.float32))


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
        return _sfp8_index(_as_fp32_matrix(weight), scale)

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


FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Int4Block(), Int4Channel(), SFP8())}


def get_format(name: str | WeightFormat) -> WeightFormat:
    if isinstance(name, WeightFormat):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}") from None


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized values. Backward: the gradient passes to the latent weight unchanged."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


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


def fake_quantize(weight: torch.Tensor, fmt: str | WeightFormat) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in the weight's dtype, with a straight-through gradient."""
    values = get_format(fmt).fake_quantize_values(weight).to(weight.dtype)
    return straight_through(weight, values)


def q4_0_blocks(qw: QuantizedWeight) -> np.ndarray:
    """The GGUF/ggml Q4_0 bytes of an int4 weight: uint8 ``[out, in // 32 * 18]``.

    Per block: the fp16 scale (little-endian), then 16 bytes, byte ``j`` = element ``j`` (low nibble) and element
    ``j + 16`` (high nibble). An int4-channel weight repeats its row scale in every block: exact, never re-derived.
    """
    if not isinstance(get_format(qw.format), _Int4):
        raise FormatError(f"Q4_0 blocks hold int4 weights, not {qw.format}")
    out, n = qw.codes.shape
    if n % Q4_0_BLOCK:
        raise FormatError(f"Q4_0 needs rows that are a multiple of {Q4_0_BLOCK}, got shape {(out, n)}")
    nb = n // Q4_0_BLOCK
    q = qw.codes.reshape(out, nb, 2, Q4_0_BLOCK // 2).cpu().numpy()
    nibbles = q[:, :, 0, :] | (q[:, :, 1, :] << np.uint8(4))
    scales = qw.scales.to(torch.float16).expand(out, nb).cpu().contiguous().numpy()
    scale_bytes = scales.reshape(out, nb, 1).view(np.uint8)  # little-endian on every platform torch runs on
    return np.concatenate([scale_bytes, nibbles], axis=-1).reshape(out, nb * Q4_0_BLOCK_BYTES)


def encode_values(values: torch.Tensor, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """fp32 values ``[rows, n]`` in ``ggml_type``'s layout, by the runtime's own rule for that type.

    F16 refuses values beyond its range (it would write inf); BF16 and Q8_0 by the gguf package's reference rules
    (= llama.cpp's); Q4_0 by int4-block's (= llama.cpp's).
    """
    x = values.to(torch.float32)
    if ggml_type == T.F32:
        return x.numpy()
    if ggml_type == T.F16:
        if x.numel() and float(x.abs().max()) > FP16_MAX:
            raise FormatError("has values beyond fp16's range; export it as bf16 or f32")
        return x.to(torch.float16).numpy()
    if ggml_type == T.Q4_0:
        return q4_0_blocks(FORMATS["int4-block"].quantize(x))
    return gguf_quants.quantize(x.numpy(), ggml_type)
