"""Mixtures of lattices: which lattice each tensor of an architecture takes. Pure (an architecture in, names out).

``mixture_lattices(arch, "q4_k_m")`` is llama-quantize's ``Q4_K_M`` per-tensor policy for dense Gemma 3
(``docs/specs/kquants.md`` §4; llama.cpp ``src/llama-quant.cpp``), the one rule that the fake-quantizer
(``qat.prepare``), the GGUF exporter, the memory model and eval share:

* the tied ``token_embd``: Q6_K, or Q8_0 when its rows (``hidden``) are not a multiple of 256;
* ``attn_v`` and ``ffn_down`` of layer ``i``: Q6_K where ``use_more_bits(i, layers)``, else Q4_K;
* every other matmul (``attn_q``, ``attn_k``, ``attn_output``, ``ffn_gate``, ``ffn_up``): Q4_K;
* then the fallback for rows that are not a whole number of the type's blocks: Q4_K -> Q5_0, Q6_K -> Q8_0, and
  F16 (left unquantized: not listed) when the row is not a multiple of 32 either.

Norms are never quantized; the vision tower and projector are not part of the text GGUF.
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gemma3_qat.formats import FORMATS, FormatError, lattice_of_type
from gemma3_qat.layout import MATMUL_ROLES, tensor_role, text_gguf_name
from gemma3_qat.models import Architecture

T = GGMLQuantizationType
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}  # llama.cpp's tensor_type_fallback, the cases Q4_K_M reaches
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits(i_layer, n_layers)``: the first and last eighth, and every third layer between
    (C integer division; the first clause keeps the modulus off negative operands)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def with_fallback(ggml_type: GGMLQuantizationType, row: int, name: str) -> GGMLQuantizationType | None:
    """The type llama-quantize writes for ``ggml_type`` chosen on rows of ``row`` weights: itself when the row is a
    whole number of its blocks, else its fallback (Q4_K -> Q5_0, Q6_K -> Q8_0), else None (F16, unquantized)."""
    if row % GGML_QUANT_SIZES[ggml_type][0] == 0:
        return ggml_type
    if ggml_type not in _FALLBACK:
        raise FormatError(f"{name}: rows of {row} weights fit no {ggml_type.name} block, and llama-quantize has "
                          "no fallback for it (it stops with 'Unsupported tensor size')")
    fallback = _FALLBACK[ggml_type]
    return fallback if row % GGML_QUANT_SIZES[fallback][0] == 0 else None


def _q4_k_m(gguf_name: str, role: str, layers: int) -> GGMLQuantizationType:
    """llama-quantize Q4_K_M's choice for one tensor, before the fallback."""
    if role == "embedding":
        return T.Q6_K  # tied: the output branch (Q8_0 when its rows are not a multiple of 256: the fallback)
    m = _LAYER.match(gguf_name)
    kind, layer = (m.group(2), int(m.group(1))) if m else ("", 0)
    if kind in ("attn_v", "ffn_down") and use_more_bits(layer, layers):
        return T.Q6_K
    return T.Q4_K


_POLICIES = {"q4_k_m": _q4_k_m}


def mixture_lattices(arch: Architecture, mixture: str) -> dict[str, str]:
    """HF name -> lattice (format name: ``q4_k``, ``q6_k``, ``q5_0``, ``q8_0-lattice``) of every tensor of
    ``arch`` that the mixture quantizes: the language model's matmuls and its tied embedding, by llama-quantize's
    policy (module docstring). A tensor the policy leaves in F16 (rows not a multiple of 32) is not listed.
    Names are ``arch.tensors()``'s (transformers' layout)."""
    if mixture not in _POLICIES:
        known = ", ".join(_POLICIES)
        what = "not a mixture" if mixture in FORMATS else "unknown"
        raise FormatError(f"{mixture!r} is {what}; the mixtures are: {known}")
    if not arch.tied_embeddings:
        raise FormatError(f"{mixture} follows llama-quantize for Gemma 3, whose head is the tied embedding; "
                          f"{arch.name} has an untied head")
    policy = _POLICIES[mixture]
    out = {}
    for t in arch.tensors():
        role = tensor_role(t.name)
        if role not in MATMUL_ROLES and role != "embedding":
            continue
        gguf_name = text_gguf_name(t.name)
        chosen = with_fallback(policy(gguf_name, role, arch.layers), t.shape[-1], t.name)
        if chosen is not None:
            out[t.name] = lattice_of_type(chosen).name
    return out
