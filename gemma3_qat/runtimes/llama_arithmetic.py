"""llama.cpp's CPU arithmetic, emulated in PyTorch: the rounding its matmuls apply to their activations.

ggml multiplies a quantized weight by activations quantized to the weight type's partner format (its
``vec_dot_type``): 32-value Q8_0 blocks (an fp16 scale ``max|x| / 127``, codes rounded to nearest) under Q4_0,
Q5_0, Q8_0 and IQ4_NL weights; 256-value Q8_K blocks (an fp32 scale set by the largest-magnitude value, -127 at
it) under the K-quants; fp16 under F16 weights; nothing under F32. A file's values in llama.cpp therefore compute
something a little different from the same values in PyTorch, and on a real Gemma 3 that difference is most of the
KL between the two (its activations carry outliers that take a whole 32-value block's scale).

Two more of its roundings decide which side of a rounding boundary those activations fall on, so they are
emulated too: GELU is read from a table of fp16 values at the fp16-rounded input (``ggml_vec_geglu_f32``), and
attention (without flash attention, as ``LlamaCppModel`` runs it) keeps K and V in an fp16 cache, rounds the
pre-scaled queries to fp16 for the K dot products and the softmax to fp16 for the V products.

``llama_cpp_arithmetic(model, gguf)`` makes a model compute that way for the types the file holds, so that the file
in llama.cpp and the model in PyTorch can be compared on the same arithmetic: what is left is the weights and the
order of accumulation. A measurement aid (tests, benchmarks); the trainer never uses it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

QK8_0, QK_K = 32, 256


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: to nearest, halves away from zero (ggml's reference Q8_0 quantizer)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``x`` (last dimension a multiple of 32) as ggml's Q8_0 holds it: per block ``d = max|x| / 127`` stored as
    fp16, codes ``roundf(x / d)`` computed with the fp32 ``d``, value ``code * fp16(d)``."""
    shape = x.shape
    b = x.float().reshape(*shape[:-1], shape[-1] // QK8_0, QK8_0)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = _round_away(b * inv)
    return (q * d.half().float()).reshape(shape).to(x.dtype)


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """``x`` (last dimension a multiple of 256) as ggml's Q8_K holds it: per block the value of largest magnitude
    ``m`` sets ``iscale = -127 / m``; codes ``min(127, round(iscale * x))`` (nearest, halves to even); fp32
    ``d = 1 / iscale``."""
    shape = x.shape
    b = x.float().reshape(*shape[:-1], shape[-1] // QK_K, QK_K)
    idx = b.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes, as ggml's strict > keeps it
    m = torch.gather(b, -1, idx)
    nonzero = m != 0
    iscale = torch.where(nonzero, -127.0 / torch.where(nonzero, m, torch.ones_like(m)), torch.zeros_like(m))
    q = torch.clamp(torch.round(iscale * b), max=127)
    d = torch.where(nonzero, 1.0 / torch.where(nonzero, iscale, torch.ones_like(iscale)), torch.zeros_like(m))
    return (q * d).reshape(shape).to(x.dtype)


def round_f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().to(x.dtype)


# ggml type name of a weight -> how its matmul's activations are rounded (None: F32, used as they are)
ACTIVATION_ROUNDING = {
    "Q4_0": round_q8_0, "Q5_0": round_q8_0, "Q8_0": round_q8_0, "IQ4_NL": round_q8_0,
    "Q2_K": round_q8_k, "Q3_K": round_q8_k, "Q4_K": round_q8_k, "Q5_K": round_q8_k, "Q6_K": round_q8_k,
    "F16": round_f16, "F32": None,
}


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU (tanh form): 0 at or below -10, the identity at or above 10, else the fp16 table's value at
    the fp16-rounded input."""
    h = x.float().half().float()
    table = (0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * h * (1.0 + 0.044715 * h * h)))).half().float()
    out = torch.where(x <= -10, torch.zeros_like(table), torch.where(x >= 10, x.float(), table))
    return out.to(x.dtype)


class GgmlGelu(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_gelu(x)


def llama_cpp_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                        **kwargs):
    """Attention as llama.cpp's CPU path computes it without flash attention: K and V rounded to the fp16 cache,
    queries scaled then rounded to fp16, fp32 scores and softmax, the probabilities rounded to fp16 for V."""
    from transformers.models.gemma3.modeling_gemma3 import repeat_kv

    if softcap is not None:
        raise NotImplementedError("attention softcapping is not emulated (Gemma 3 has none)")
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    groups = module.num_key_value_groups
    k = repeat_kv(round_f16(key.float()), groups)
    v = repeat_kv(round_f16(value.float()), groups)
    q = round_f16(query.float() * scaling)
    scores = torch.matmul(q, k.transpose(2, 3))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = round_f16(torch.softmax(scores, dim=-1, dtype=torch.float32))
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out.to(query.dtype), probs


def gguf_weight_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@contextmanager
def llama_cpp_arithmetic(model: nn.Module, gguf: str | Path | dict[str, str]):
    """Within the context, ``model`` computes as llama.cpp's CPU backend does on the file ``gguf`` (a path, or its
    tensor name -> type map): every linear layer's input rounded for the type the file holds that weight in (the
    tied output head follows ``token_embd.weight``), GELU from ggml's fp16 table, attention through an fp16 KV
    cache. Yields the number of linear layers whose inputs it rounds."""
    from transformers.models.gemma3 import modeling_gemma3

    from gemma3_qat.errors import InputError
    from gemma3_qat.layout import text_gguf_name

    types = gguf if isinstance(gguf, dict) else gguf_weight_types(gguf)
    names = {name: text_gguf_name(name) for name in model.state_dict()}
    handles, acts = [], []
    attention = getattr(model.config, "_attn_implementation", None)
    eager = modeling_gemma3.eager_attention_forward
    try:
        for mod_name, module in model.named_modules():
            if isinstance(module, modeling_gemma3.Gemma3MLP):
                acts.append((module, module.act_fn))
                module.act_fn = GgmlGelu()
            if not isinstance(module, nn.Linear):
                continue
            gguf_name = ("token_embd.weight" if mod_name.split(".")[-1] == "lm_head"
                         else names.get(f"{mod_name}.weight"))
            if gguf_name is None:
                continue  # not a text tensor (a vision tower's)
            if gguf_name not in types:
                raise InputError(f"{gguf_name} is not in the GGUF file: give the file exported from this model")
            kind = types[gguf_name]
            if kind not in ACTIVATION_ROUNDING:
                raise InputError(f"{gguf_name} is {kind}: its activation rounding in llama.cpp is not emulated "
                                 f"(known: {', '.join(ACTIVATION_ROUNDING)})")
            rounding = ACTIVATION_ROUNDING[kind]
            if rounding is not None:
                handles.append(module.register_forward_pre_hook(lambda _m, args, r=rounding: (r(args[0]), *args[1:])))
        modeling_gemma3.eager_attention_forward = llama_cpp_attention
        model.set_attn_implementation("eager")
        yield len(handles)
    finally:
        modeling_gemma3.eager_attention_forward = eager
        if attention is not None:
            model.set_attn_implementation(attention)
        for module, act in acts:
            module.act_fn = act
        for h in handles:
            h.remove()
