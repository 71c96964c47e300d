"""The int4 formats: int4-block (llama.cpp Q4_0, bit for bit) and int4-channel (Q4_0's rule over the whole row)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from gemma3_qat.formats.base import FormatError, QuantizedWeight, as_fp32_matrix
from gemma3_qat.formats.q4_0 import (Q4_0_BLOCK, extreme_position, int4_values, pack_q4_0, q4_0_extreme_and_scale,
                                     q4_0_off_boundaries, q4_0_q, q4_0_scale, signed_extreme)
from gemma3_qat.formats.weight_format import WeightFormat

T = GGMLQuantizationType
INT4_FORMATS = ("int4-block", "int4-channel")  # the formats whose codes Q4_0 blocks hold


class Int4(WeightFormat):
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
        return signed_extreme(self.groups_of(weight))

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
        side.scatter_(-1, extreme_position(groups, signed_extreme(groups)), bound)
        return torch.where(keep, groups, side * sign).reshape(weight.shape)

    def off_boundaries(self, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``[rows, in]`` fp32 latent with the same codes and scales and no weight on a rounding boundary, and how
        many moved (``q4_0.q4_0_off_boundaries``)."""
        moved, n = q4_0_off_boundaries(self.groups_of(weight))
        return moved.reshape(weight.shape), n

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
        extreme, inv, scale = q4_0_extreme_and_scale(groups)
        q = q4_0_q(groups, inv).sub_(8.0)
        D = scale.to(torch.float32)
        ratio = torch.where(D == 0, torch.zeros_like(groups), groups / torch.where(D == 0, torch.ones_like(D), D))
        grad_scale = (g * (q - ratio)).sum(dim=-1, keepdim=True)
        out = torch.zeros_like(groups)
        out.scatter_(-1, extreme_position(groups, extreme), grad_scale / -8.0)
        return out.reshape(weight.shape).to(grad.dtype)


class Int4Block(Int4):
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
        w = as_fp32_matrix(weight)
        return w.reshape(w.shape[0], w.shape[1] // Q4_0_BLOCK, Q4_0_BLOCK)

    groups_of = _blocks

    def quantize(self, weight):
        blocks = self._blocks(weight)
        inv, scale = q4_0_scale(blocks)
        codes = q4_0_q(blocks, inv).to(torch.uint8)
        return QuantizedWeight(self.name, codes.reshape(weight.shape), scale.squeeze(-1))

    def dequantize(self, qw):
        out, n = qw.codes.shape
        q = qw.codes.reshape(out, n // Q4_0_BLOCK, Q4_0_BLOCK)
        return int4_values(q, qw.scales.unsqueeze(-1)).reshape(out, n)

    def fake_quantize_values(self, weight):
        blocks = self._blocks(weight)
        inv, scale = q4_0_scale(blocks)
        return q4_0_q(blocks, inv).sub_(8.0).mul_(scale.to(torch.float32)).reshape(weight.shape)


class Int4Channel(Int4):
    name = "int4-channel"
    summary = "int4, one fp16 scale per output channel (Q4_0's rule over the whole row)"
    runtimes = "vLLM (compressed-tensors W4A16 channel), llama.cpp as Q4_0 with the row scale in every block"
    granularity = "row"  # 4 bits + one fp16 scale per row; GGUF stores it as Q4_0 (4.5)
    gguf_caveat = ("int4-channel is stored as Q4_0 with each row's scale in every block: exact, but 4.5 bits per "
                   "weight in GGUF (the 4-bit saving needs compressed-tensors or gemma.cpp)")

    def quantize(self, weight):
        self.check_shape(tuple(weight.shape))
        rows = as_fp32_matrix(weight)
        inv, scale = q4_0_scale(rows)
        return QuantizedWeight(self.name, q4_0_q(rows, inv).to(torch.uint8), scale)

    def dequantize(self, qw):
        return int4_values(qw.codes, qw.scales)

    def groups_of(self, weight):
        self.check_shape(tuple(weight.shape))
        return as_fp32_matrix(weight).unsqueeze(1)  # one group: the row

    def fake_quantize_values(self, weight):
        self.check_shape(tuple(weight.shape))
        rows = as_fp32_matrix(weight)
        inv, scale = q4_0_scale(rows)
        return q4_0_q(rows, inv).sub_(8.0).mul_(scale.to(torch.float32))



def q4_0_blocks(qw: QuantizedWeight) -> np.ndarray:
    """The GGUF/ggml Q4_0 bytes of an int4 weight: uint8 ``[out, in // 32 * 18]`` (``q4_0.pack_q4_0``). An
    int4-channel weight repeats its row scale in every block: exact, never re-derived."""
    if qw.format not in INT4_FORMATS:
        raise FormatError(f"Q4_0 blocks hold int4 weights, not {qw.format}")
    return pack_q4_0(qw.codes, qw.scales)
