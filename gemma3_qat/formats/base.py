"""What every format shares: its error, the stored form of a quantized weight, the fp32 view of a weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma3_qat.errors import InputError

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


def as_fp32_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise FormatError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.float32)

