"""The QAT weight formats: their numerics (the single source of truth) and their container facts.

Both the fake-quantizer (training) and the exporters call these functions, which is what makes an export
bit-exact with the weights the student was trained with. The rules are ported from the runtimes
(``docs/specs/formats.md``):

* ``int4-block``   llama.cpp Q4_0 (``q4_0``): blocks of 32 input features of one output row, scale from the SIGNED
                   extreme ``d = m / -8``, codes ``min(15, trunc(x * (1/d) + 8.5))``, stored scale ``fp16(d)``.
* ``int4-channel`` the same rule with the block = the whole row (one fp16 scale per output channel).
* ``sfp8``         gemma.cpp switched floating point, production encoder, with ``ScaleWeights``' per-tensor scale.
* ``q4_k`` ``q6_k`` ``q5_0`` ``q8_0-lattice``  llama.cpp's Q4_K, Q6_K, Q5_0 and Q8_0, bit for bit (``kquants``; the
                   Q8_0 lattice is not ``q8_0``, which names the plain post-training type of ``export --type``).
* ``q4_k_m``       a mixture (``mixture.Mixture``): llama.cpp's Q4_K_M file, each tensor on the lattice
                   llama-quantize Q4_K_M gives it (the policy: ``gemma3_qat.mixtures``).

All math is fp32 whatever the weight's dtype, vectorised torch, on the weight's own device (CPU or CUDA). A
weight is a 2-D ``[out, in]`` tensor as ``nn.Linear`` and ``nn.Embedding`` hold it.

Each format also owns the facts of the containers it is stored in (``weight_format.WeightFormat``): its compact
container, its GGUF encoding, its compressed-tensors scheme. Adding a format is one class and one entry in
``FORMATS`` (``tests/test_layout.py`` registers a throwaway int8 format and exports it).

Modules: ``base`` (error, stored form), ``q4_0`` (the Q4_0 rule as pure functions), ``kquants`` (ggml's K-quant,
Q5_0 and Q8_0 reference quantizers as pure functions), ``weight_format`` (the base class), ``int4``, ``sfp8`` and
``lattices`` (the formats), ``mixture`` (mixtures of lattices), ``straight_through`` (the estimator).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from gemma3_qat.formats.base import FP16_MAX, FormatError, QuantizedWeight
from gemma3_qat.formats.int4 import Int4, Int4Block, Int4Channel, q4_0_blocks
from gemma3_qat.formats.lattices import LATTICE_CLASSES, Lattice, LatticeWeight
from gemma3_qat.formats.mixture import MIXTURE_CLASSES, Mixture
from gemma3_qat.formats.q4_0 import Q4_0_BLOCK, Q4_0_BLOCK_BYTES
from gemma3_qat.formats.sfp8 import SFP8, SFP8_DECODE_TABLE, sfp8_scale, sfp8_values_fit_bf16
from gemma3_qat.formats.straight_through import straight_through
from gemma3_qat.formats.weight_format import GGUFEncoding, WeightFormat, encode_values

__all__ = ["FP16_MAX", "Q4_0_BLOCK", "Q4_0_BLOCK_BYTES", "FormatError", "QuantizedWeight", "GGUFEncoding", "WeightFormat", "Int4", "Int4Block",
           "Int4Channel", "SFP8", "FORMATS", "get_format", "fake_quantize", "straight_through", "q4_0_blocks",
           "encode_values", "SFP8_DECODE_TABLE", "sfp8_scale", "sfp8_values_fit_bf16", "Lattice", "LatticeWeight",
           "Mixture", "lattice_of_type", "lattice_formats"]

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Int4Block(), Int4Channel(), SFP8(),
                                                         *(c() for c in LATTICE_CLASSES),
                                                         *(c() for c in MIXTURE_CLASSES))}


def lattice_formats() -> dict[str, WeightFormat]:
    """The registered formats that have numerics of their own (every format but the mixtures)."""
    return {name: f for name, f in FORMATS.items() if not f.is_mixture}


def lattice_of_type(ggml_type: GGMLQuantizationType) -> Lattice:
    """The llama.cpp lattice format of a ggml type (Q4_K -> ``q4_k``, Q8_0 -> ``q8_0-lattice``)."""
    for f in FORMATS.values():
        if isinstance(f, Lattice) and f.ggml == ggml_type:
            return f
    raise FormatError(f"no lattice format for the GGML type {ggml_type.name}")


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

