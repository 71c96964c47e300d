"""llama.cpp's K-quant and legacy lattices as QAT formats: Q4_K, Q6_K, Q5_0, Q8_0 (numerics: ``kquants``).

Each class is the lattice of one ggml type, bit for bit: ``fake_quantize_values`` is ggml's reference quantizer
followed by its dequantizer (``kquants.fake_quantize_*``), ``gguf_encode`` packs the codes that quantizer gives the
trained latent weights (``kquants.pack_*``), never re-derived by another rule. The gradient is the plain
straight-through estimator (``FakeQuantizer``); the scales are ggml's searches, not learned.

Names: the ggml type in lower case (``q4_k``, ``q6_k``, ``q5_0``), except where that name is already taken by a
plain type of ``export --type`` / ``memory --format`` (``f32 f16 bf16 q8_0 q4_0``: post-training conversion of a
plain checkpoint): Q8_0's lattice is ``q8_0-lattice``, so that ``memory --format q8_0`` keeps meaning the PTQ
baseline. (Q4_0's lattice is ``int4-block`` for the same reason.)

The compact container of these formats is ggml's own block layout (their GGUF bytes: Q4_K 4.5 bits per weight,
Q6_K 6.5625, Q5_0 5.5, Q8_0 8.5); they have no compressed-tensors scheme and no gemma.cpp type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemma3_qat.formats import kquants
from gemma3_qat.formats.base import FormatError, QuantizedWeight
from gemma3_qat.formats.weight_format import WeightFormat

T = GGMLQuantizationType


@dataclass(frozen=True)
class LatticeWeight(QuantizedWeight):
    """A weight on a llama.cpp lattice: ``codes`` (ggml's integer codes per weight), ``scales`` (the fp16 block
    scale ``d``, ``[out, in // block]``) and ``stored``, ggml's whole stored form (``kquants.KQuantized``: Q4_K's
    sub-block scales and mins, Q6_K's int8 sub-block scales)."""

    stored: kquants.KQuantized | None = None


class Lattice(WeightFormat):
    """One ggml weight type as a QAT format. A subclass names the type and its four ``kquants`` functions."""

    ggml: GGMLQuantizationType
    suggestion = ""  # what check_shape's refusal suggests
    scale_dtype = torch.float16
    _quantize: Callable[[torch.Tensor], kquants.KQuantized]
    _dequantize: Callable[[kquants.KQuantized], torch.Tensor]
    _fake_quantize: Callable[[torch.Tensor], torch.Tensor]
    _pack: Callable[[kquants.KQuantized], np.ndarray]

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def block_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][1]

    def check_shape(self, shape):
        super().check_shape(shape)
        if shape[1] % self.block:
            raise FormatError(f"{self.name} needs rows that are a multiple of {self.block} weights ({self.ggml.name} "
                              f"blocks), got shape {tuple(shape)}{self.suggestion}")

    def quantize(self, weight):
        self.check_shape(tuple(weight.shape))
        q = type(self)._quantize(weight)
        return LatticeWeight(self.name, q.codes, q.d, q)

    def dequantize(self, qw):
        if not isinstance(qw, LatticeWeight) or qw.format != self.name:
            raise FormatError(f"{self.name} dequantizes its own weights, not {qw.format}")
        return type(self)._dequantize(qw.stored)

    def fake_quantize_values(self, weight):
        self.check_shape(tuple(weight.shape))
        return type(self)._fake_quantize(weight)

    # the compact container is ggml's block layout: the GGUF bytes
    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / self.block

    def compact_bytes(self, shape):
        self.check_shape(tuple(shape))
        return shape[0] * shape[1] // self.block * self.block_bytes

    @property
    def compact_label(self) -> str:
        return self.ggml.name

    def gguf_encode(self, rows, ggml_type, tensor_scale=None):
        if ggml_type != self.ggml:
            return super().gguf_encode(rows, ggml_type, tensor_scale)
        self.check_shape(tuple(rows.shape))
        return type(self)._pack(type(self)._quantize(rows))  # the trained codes, as ggml stores them


_FALLBACK = ": llama-quantize falls back to another type there; train --format q4_k_m, which does the same"


class Q4K(Lattice):
    name = "q4_k"
    summary = "llama.cpp Q4_K: 4-bit affine sub-blocks of 32, 6-bit scales and mins, fp16 super-scales per 256"
    runtimes = "llama.cpp / Ollama / LM Studio (GGUF Q4_K, bit-exact)"
    ggml = T.Q4_K
    code_bits, code_name, granularity = 4, "q4_k", kquants.Q4_K_BLOCK
    gguf_exact = (T.Q4_K,)
    suggestion = _FALLBACK
    _quantize = staticmethod(kquants.quantize_q4_k)
    _dequantize = staticmethod(kquants.dequantize_q4_k)
    _fake_quantize = staticmethod(kquants.fake_quantize_q4_k)
    _pack = staticmethod(kquants.pack_q4_k)


class Q6K(Lattice):
    name = "q6_k"
    summary = "llama.cpp Q6_K: symmetric 6-bit sub-blocks of 16, int8 scales, one fp16 scale per 256"
    runtimes = "llama.cpp / Ollama / LM Studio (GGUF Q6_K, bit-exact)"
    ggml = T.Q6_K
    code_bits, code_name, granularity = 6, "q6_k", kquants.Q6_K_BLOCK
    gguf_exact = (T.Q6_K,)
    suggestion = _FALLBACK
    _quantize = staticmethod(kquants.quantize_q6_k)
    _dequantize = staticmethod(kquants.dequantize_q6_k)
    _fake_quantize = staticmethod(kquants.fake_quantize_q6_k)
    _pack = staticmethod(kquants.pack_q6_k)


class Q50(Lattice):
    name = "q5_0"
    summary = "llama.cpp Q5_0: 5-bit codes, one fp16 scale per 32 from the signed extreme (Q4_K_M's fallback)"
    runtimes = "llama.cpp / Ollama / LM Studio (GGUF Q5_0, bit-exact)"
    ggml = T.Q5_0
    code_bits, code_name, granularity = 5, "q5_0", kquants.Q5_0_BLOCK
    gguf_exact = (T.Q5_0,)
    _quantize = staticmethod(kquants.quantize_q5_0)
    _dequantize = staticmethod(kquants.dequantize_q5_0)
    _fake_quantize = staticmethod(kquants.fake_quantize_q5_0)
    _pack = staticmethod(kquants.pack_q5_0)


class Q80Lattice(Lattice):
    name = "q8_0-lattice"  # not "q8_0": that is the plain (post-training) type of export --type / memory --format
    summary = "llama.cpp Q8_0 trained on: int8 codes, one fp16 scale per 32 (Q4_K_M's fallback for Q6_K)"
    runtimes = "llama.cpp / Ollama / LM Studio (GGUF Q8_0, bit-exact)"
    ggml = T.Q8_0
    code_bits, code_name, granularity = 8, "q8_0", kquants.Q8_0_BLOCK
    gguf_exact = (T.Q8_0,)
    _quantize = staticmethod(kquants.quantize_q8_0)
    _dequantize = staticmethod(kquants.dequantize_q8_0)
    _fake_quantize = staticmethod(kquants.fake_quantize_q8_0)
    _pack = staticmethod(kquants.pack_q8_0)


LATTICE_CLASSES = (Q4K, Q6K, Q50, Q80Lattice)
