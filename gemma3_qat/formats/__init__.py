"""The QAT weight formats: their numerics (the single source of truth) and their container facts.

Both the fake-quantizer (training) and the exporters call these functions, which is what makes an export
bit-exact with the weights the student was trained with. The rules are ported from the runtimes
(``docs/specs/formats.md``):

* ``int4-block``   llama.cpp Q4_0 (``q4_0``): blocks of 32 input features of one output row, scale from the SIGNED
                   extreme ``d = m / -8``, codes ``min(15, trunc(x * (1/d) + 8.5))``, stored scale ``fp16(d)``.
* ``int4-channel`` the same rule with the block = the whole row (one fp16 scale per output channel).
* ``sfp8``         gemma.cpp switched floating point, production encoder, with ``ScaleWeights``' per-tensor scale.

All math is fp32 whatever the weight's dtype, vectorised torch, on the weight's own device (CPU or CUDA). A
weight is a 2-D ``[out, in]`` tensor as ``nn.Linear`` and ``nn.Embedding`` hold it.

Each format also owns the facts of the containers it is stored in (``weight_format.WeightFormat``): its compact
container, its GGUF encoding, its compressed-tensors scheme. Adding a format is one class and one entry in
``FORMATS`` (``tests/test_layout.py`` registers a throwaway int8 format and exports it).

Modules: ``base`` (error, stored form), ``q4_0`` (the Q4_0 rule as pure functions), ``weight_format`` (the base
class), ``int4`` and ``sfp8`` (the formats), ``straight_through`` (the estimator).
"""

from __future__ import annotations

import torch

from gemma3_qat.formats.base import FP16_MAX, FormatError, QuantizedWeight
from gemma3_qat.formats.int4 import Int4, Int4Block, Int4Channel, q4_0_blocks
from gemma3_qat.formats.q4_0 import Q4_0_BLOCK, Q4_0_BLOCK_BYTES
from gemma3_qat.formats.sfp8 import SFP8, SFP8_DECODE_TABLE, sfp8_scale, sfp8_values_fit_bf16
from gemma3_qat.formats.straight_through import straight_through
from gemma3_qat.formats.weight_format import GGUFEncoding, WeightFormat, encode_values

__all__ = ["FP16_MAX", "Q4_0_BLOCK", "Q4_0_BLOCK_BYTES", "FormatError", "QuantizedWeight", "GGUFEncoding", "WeightFormat", "Int4", "Int4Block",
           "Int4Channel", "SFP8", "FORMATS", "get_format", "fake_quantize", "straight_through", "q4_0_blocks",
           "encode_values", "SFP8_DECODE_TABLE", "sfp8_scale", "sfp8_values_fit_bf16"]

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Int4Block(), Int4Channel(), SFP8())}


def get_format(name: str | WeightFormat) -> WeightFormat:
    if isinstance(name, WeightFormat):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}") from None



def fake_quantize(weight: torch.Tensor, fmt: str | WeightFormat) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in the weight's dtype, with a straight-through gradient."""
    values = get_format(fmt).fake_quantize_values(weight).to(weight.dtype)
    return straight_through(weight, values)

