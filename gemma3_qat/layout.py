"""Where each tensor of a Gemma 3 checkpoint goes and how it is typed: names, roles, the GGUF type policy. Pure.

One home for the facts the GGUF and safetensors exporters and the memory model share, so that they cannot
drift apart (no I/O here: names and shapes in, decisions out):

* names: HF -> GGUF for the text model (``text_gguf_name``) and the mmproj file (``vision_gguf_name``), and the
  legacy multimodal HF key layout llama.cpp's converter reads (``legacy_name``);
* roles: each tensor is one of ``models.ROLES`` (the memory report's groups), or None for the tied head, which is
  never stored; ``is_quantized`` is the one name-based rule for "which tensors QAT quantized" (the matmuls, and
  the embedding when it was trained quantized): ``models.quantizable_linears`` is its form over modules, and
  ``tests/test_layout.py`` checks that both agree;
* the GGUF type of every tensor (``GGUFTypes``): norms F32, trained tensors as their format says, the rest by
  the export options. The format's own facts (its GGUF encoding, its compact bytes) live on the format object.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from gemma3_qat.errors import InputError
from gemma3_qat.formats import FORMATS, WeightFormat
from gemma3_qat.models import QUANTIZED_GROUPS

T = GGMLQuantizationType
PLAIN_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
EMBEDDING_TYPES = ("auto", "q4_0", "q8_0", "f16", "bf16", "f32")
VISION_TYPES = ("f32", "f16", "bf16")
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
              T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q5_0: LlamaFileType.MOSTLY_Q5_0,
              T.Q4_K: LlamaFileType.MOSTLY_Q4_K_S, T.Q6_K: LlamaFileType.MOSTLY_Q6_K}
MATMUL_ROLES = QUANTIZED_GROUPS  # the language model's matmuls (attention, mlp): what QAT always quantizes

_TEXT_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {  # HF name in a decoder layer -> (GGUF name, role)
    "input_layernorm.weight": ("attn_norm.weight", "norms"),
    "self_attn.q_proj.weight": ("attn_q.weight", "attention"),
    "self_attn.k_proj.weight": ("attn_k.weight", "attention"),
    "self_attn.v_proj.weight": ("attn_v.weight", "attention"),
    "self_attn.o_proj.weight": ("attn_output.weight", "attention"),
    "self_attn.q_norm.weight": ("attn_q_norm.weight", "norms"),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", "norms"),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", "norms"),
    "pre_feedforward_layernorm.weight": ("ffn_norm.weight", "norms"),
    "post_feedforward_layernorm.weight": ("post_ffw_norm.weight", "norms"),
    "mlp.gate_proj.weight": ("ffn_gate.weight", "mlp"),
    "mlp.up_proj.weight": ("ffn_up.weight", "mlp"),
    "mlp.down_proj.weight": ("ffn_down.weight", "mlp"),
}
_TEXT_NAMES = {"embed_tokens.weight": ("token_embd.weight", "embedding"),
               "norm.weight": ("output_norm.weight", "norms")}
_VISION_PREFIX = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?")
_PROJECTOR_PREFIX = re.compile(r"^(?:model\.)?multi_modal_projector\.")
_VISION_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
_VISION_FIXED = {"embeddings.patch_embedding.weight": "v.patch_embd.weight",
                 "embeddings.patch_embedding.bias": "v.patch_embd.bias",
                 "embeddings.position_embedding.weight": "v.position_embd.weight",
                 "post_layernorm.weight": "v.post_ln.weight", "post_layernorm.bias": "v.post_ln.bias"}
_PROJECTOR_NAMES = {"mm_input_projection_weight": "mm.input_projection.weight",
                    "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight"}
# mmproj tensors llama.cpp's clip loader wants in F32 whatever their rank (convolution and position tables)
_VISION_F32 = ("v.patch_embd.weight", "v.position_embd.weight")


class ExportError(InputError):
    """A checkpoint or option combination the exporter cannot turn into a correct file."""


# ------------------------------------------------------------------------------------------------- names, roles


def _text_entry(hf_name: str) -> tuple[str, str] | None:
    """(GGUF name, role) of a text-model tensor; None for the tied head and for vision/projector tensors."""
    if _VISION_PREFIX.match(hf_name) or _PROJECTOR_PREFIX.match(hf_name) or hf_name == "lm_head.weight":
        return None
    name = _TEXT_PREFIX.sub("", hf_name)
    if name in _TEXT_NAMES:
        return _TEXT_NAMES[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        gguf_name, role = _LAYER_NAMES[m.group(2)]
        return f"blk.{m.group(1)}.{gguf_name}", role
    raise ExportError(f"unexpected tensor {hf_name!r} in a Gemma 3 text model; is this a Gemma 3 checkpoint?")


def text_gguf_name(hf_name: str) -> str | None:
    """GGUF name of a text-model tensor; None for tensors that are not written (the tied head) or not text."""
    entry = _text_entry(hf_name)
    return entry[0] if entry else None


def vision_gguf_name(hf_name: str) -> str | None:
    """GGUF name (mmproj file) of a vision-tower or projector tensor; None for the others."""
    if _PROJECTOR_PREFIX.match(hf_name):
        return _PROJECTOR_NAMES.get(_PROJECTOR_PREFIX.sub("", hf_name))
    if not _VISION_PREFIX.match(hf_name):
        return None
    name = _VISION_PREFIX.sub("", hf_name)
    if name in _VISION_FIXED:
        return _VISION_FIXED[name]
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _VISION_LAYER_NAMES:
        return f"v.blk.{m.group(1)}.{_VISION_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ExportError(f"unexpected vision tensor {hf_name!r}")


def gguf_role(gguf_name: str) -> str | None:
    """The role of a tensor in a text GGUF, by its GGUF name (any writer's: llama.cpp's converter uses the same
    names); None for names this layout does not write."""
    if gguf_name in _GGUF_TEXT_ROLES:
        return _GGUF_TEXT_ROLES[gguf_name]
    m = re.match(r"^blk\.\d+\.(.+)$", gguf_name)
    return _GGUF_LAYER_ROLES.get(m.group(1)) if m else None


_GGUF_LAYER_ROLES = dict(_LAYER_NAMES.values())
_GGUF_TEXT_ROLES = dict(_TEXT_NAMES.values())


def legacy_name(name: str) -> str:
    """HF key in the legacy multimodal layout (``language_model.model.*``, ``vision_tower.vision_model.*``)."""
    name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
    name = re.sub(r"^(?:model\.)?vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", name)
    name = re.sub(r"^model\.vision_tower\.", "vision_tower.", name)
    return re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", name)


def tensor_role(hf_name: str) -> str | None:
    """The role (one of ``ROLES``) of a checkpoint tensor; None for the tied head, which is never stored."""
    if _PROJECTOR_PREFIX.match(hf_name):
        return "projector"
    if _VISION_PREFIX.match(hf_name):
        return "vision"
    entry = _text_entry(hf_name)
    return entry[1] if entry else None


def is_quantized(hf_name: str, quantize_embeddings: bool) -> bool:
    """Whether QAT trained this tensor on its format's grid: the language model's matmuls, and the (tied)
    embedding with ``--quantize-embeddings``. The vision tower and projector never are."""
    return role_is_quantized(tensor_role(hf_name), quantize_embeddings)


def role_is_quantized(role: str | None, quantize_embeddings: bool) -> bool:
    return role in MATMUL_ROLES or (role == "embedding" and quantize_embeddings)


# ------------------------------------------------------------------------------------------------- GGUF types


def check_rows(ggml_type: GGMLQuantizationType, hf_name: str, shape: tuple[int, ...]) -> None:
    """Refuse a block type for rows that are not a whole number of its blocks."""
    block = GGML_QUANT_SIZES[ggml_type][0]
    if block > 1 and shape[-1] % block:
        raise ExportError(f"{hf_name}: shape {shape} has rows that are not a multiple of {block}, which "
                          f"{ggml_type.name} needs; keep it in f16, bf16 or f32")


@dataclass(frozen=True)
class GGUFTypes:
    """The GGUF type of every tensor of one export: what ``export_gguf`` writes and ``memory`` predicts.

    ``format``              the QAT checkpoint's format (its trained tensors); None for a plain checkpoint.
    ``plain_type``          a plain checkpoint's body: f32 | f16 | bf16 | q8_0 | q4_0 (default f16).
    ``quantize_embeddings`` the embedding was trained quantized (it then follows the format).
    ``embedding_type``      an embedding not trained quantized: ``auto`` = Q8_0 (llama.cpp's QAT choice), or
                            the plain type when that is f32/f16/bf16; or a type name.
    ``vision_type``         the mmproj matrices (vectors and the patch/position tables are always F32).
    ``lossy``               the format's lossy GGUF type instead of its exact one (sfp8: Q8_0).
    ``lattices``            HF name -> the format of each trained tensor (a mixture's per-tensor lattices, from
                            ``mixtures.mixture_lattices`` or the run's qat.json); None: ``format`` for all. A
                            mixture's matmul or embedding that is not listed is F16 (its policy's "unusual shape").
    """

    format: WeightFormat | None = None
    plain_type: str | None = None
    quantize_embeddings: bool = False
    embedding_type: str = "auto"
    vision_type: str = "f16"
    lossy: bool = False
    lattices: Mapping[str, WeightFormat] | None = None

    def __post_init__(self):
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ExportError(f"unknown --embedding-type {self.embedding_type!r}; choose one of: "
                              f"{', '.join(EMBEDDING_TYPES)}")
        if self.vision_type not in VISION_TYPES:
            raise ExportError(f"unknown vision type {self.vision_type!r}; choose one of: {', '.join(VISION_TYPES)}")
        if self.format is not None and self.plain_type is not None:
            raise ExportError(f"a QAT checkpoint ({self.format.name}) takes its types from qat.json; drop --type")
        if self.format is None:
            object.__setattr__(self, "plain_type", self.plain_type or "f16")
            if self.plain_type not in PLAIN_TYPES:
                raise ExportError(f"unknown --type {self.plain_type!r}; choose one of: {', '.join(PLAIN_TYPES)}")
        if self.lossy and (self.format is None or self.format.gguf_lossy is None):
            lossy = [f for f in FORMATS.values() if f.gguf_lossy is not None]
            raise ExportError(f"--lossy only applies to {', '.join(f.name for f in lossy)} checkpoints (" + "; ".join(
                f"{f.gguf_lossy.name} instead of exact {'/'.join(t.name for t in f.gguf_exact)} values"
                for f in lossy) + ")")
        if self.quantize_embeddings and self.format is None:
            raise ExportError("a quantized embedding needs a QAT format")
        if self.format is not None and self.format.is_mixture:
            if self.embedding_type != "auto":
                raise ExportError(f"a {self.format.name} file's embedding takes its policy's type (its trained "
                                  f"lattice); drop --embedding-type {self.embedding_type}")
            if self.lattices is None:
                raise ExportError(f"{self.format.name} is a mixture: its types need each tensor's lattice")
            object.__setattr__(self, "quantize_embeddings", True)  # the policy quantizes the tied embedding

    def format_of(self, role: str | None, hf_name: str | None = None) -> WeightFormat | None:
        """The format whose trained codes a tensor of ``role`` (named ``hf_name``) holds; None for the others."""
        if self.format is None or not role_is_quantized(role, self.quantize_embeddings):
            return None
        if self.lattices is not None:
            return self.lattices.get(hf_name)
        return self.format

    def trained(self, role: str | None, hf_name: str | None = None) -> bool:
        """Whether a tensor of ``role`` (named ``hf_name``) holds trained codes."""
        return self.format_of(role, hf_name) is not None

    def ggml_type(self, role: str, gguf_name: str, shape: tuple[int, ...], *,
                  tensor_scale=None, hf_name: str | None = None) -> GGMLQuantizationType:
        """The type of one tensor. ``tensor_scale``: a per-tensor-scale format's scale of this tensor, where the
        exact type depends on it (sfp8); None predicts the usual case. ``hf_name``: its checkpoint name, which
        ``lattices`` is keyed by."""
        if role in ("vision", "projector"):
            vector_like = len(shape) == 1 or gguf_name in _VISION_F32
            return T.F32 if vector_like else PLAIN_TYPES[self.vision_type]
        if role == "norms":
            return T.F32  # and Gemma's (1 + w) folded in
        fmt = self.format_of(role, hf_name)
        if fmt is not None:
            return fmt.gguf_ggml_type(lossy=self.lossy, tensor_scale=tensor_scale)
        if self.format is not None and self.format.is_mixture and role_is_quantized(role, True):
            return T.F16  # rows that fit no block of the policy's types: llama-quantize keeps them F16
        if role == "embedding":
            if self.embedding_type != "auto":
                return PLAIN_TYPES[self.embedding_type]
            return PLAIN_TYPES[self.plain_type] if self.plain_type in ("f32", "f16", "bf16") else T.Q8_0
        if role in MATMUL_ROLES:
            return PLAIN_TYPES[self.plain_type]
        raise ExportError(f"{gguf_name}: no GGUF type for a tensor of role {role!r}")

    def file_type(self, matmul_type: GGMLQuantizationType | None) -> LlamaFileType:
        """``general.file_type``: a mixture's own (q4_k_m: MOSTLY_Q4_K_M, as llama-quantize writes), else the type
        of the body's matmuls."""
        if self.format is not None and self.format.gguf_file_type is not None:
            return self.format.gguf_file_type
        return FILE_TYPES.get(matmul_type, LlamaFileType.ALL_F32)
