"""The base class of every weight format: numerics to implement, and the container facts derived from them.

A subclass sets the class attributes and writes ``quantize`` / ``dequantize`` (and, where it is not the default
``values -> GGUF type``, ``gguf_encode``); everything the exporters and the memory model need is derived here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from gemma3_qat.formats.base import FP16_MAX, FormatError, QuantizedWeight
from gemma3_qat.formats.q4_0 import q4_0_bytes_of

T = GGMLQuantizationType


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
    gguf_file_type: LlamaFileType | None = None  # general.file_type where it is the format's (a mixture's), not
    # the body's type
    safetensors_codes: bool = False  # its codes + scale are a safetensors layout of their own (named after it)
    safetensors_metadata: dict[str, str] = {}  # that layout's file metadata
    is_mixture: bool = False  # a per-tensor choice of lattices (``formats.mixture``), with no numerics of its own

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

    def off_boundaries(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The latent moved off the format's rounding boundaries, codes unchanged, and how many weights moved.
        Formats with a boundary rule override it (int4); the others keep the weight."""
        return weight, 0

    def scale_gradient(self, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """The gradient a scale derived from the weights passes back to the weight that sets it (see ``int4.Int4``);
        None for formats whose scale is not set by one weight."""
        return None

    def tensor_scale(self, maxabs: torch.Tensor) -> torch.Tensor:
        """The per-tensor scale from the tensor's max |w| (formats with ``granularity == "tensor"``)."""
        raise FormatError(f"{self.name} has no per-tensor scale")

    def tensor_scale_of(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The whole tensor's scale where the format has one per tensor (``granularity == "tensor"``), else None:
        what ``rows_values`` needs to quantize some rows of it exactly as the whole tensor."""
        if self.granularity != "tensor":
            return None
        w = weight.detach()
        return self.tensor_scale(torch.maximum(w.amax(), -w.amin()).to(torch.float32))

    def rows_values(self, rows: torch.Tensor, tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized values of some whole rows of a tensor (a chunk for an export, the rows an embedding
        looks up): every format's groups lie within a row, so they equal those rows of the whole tensor's values,
        given the tensor's own scale where the format has one per tensor (``tensor_scale_of``)."""
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

    @property
    def bits_range(self) -> tuple[float, float]:
        """The lowest and highest bits per weight of its tensors (a mixture's differ)."""
        return (self.bits_per_weight, self.bits_per_weight)

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
        return encode_values(self.rows_values(rows, tensor_scale), ggml_type)

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
        return q4_0_bytes_of(x)
    return gguf_quants.quantize(x.numpy(), ggml_type)
