"""Export a Gemma 3 checkpoint to GGUF for llama.cpp, in pure Python with the ``gguf`` package.

* A QAT checkpoint (``qat.json``): int4-block / int4-channel matmul weights become Q4_0 **from the trained codes
  and scales** (the per-channel scale repeated in each block of its row), computed by ``gemma3_qat.formats`` from
  the latent weights exactly as the training forward did; never re-derived by another quantizer. sfp8 has no GGUF
  type: its exact values go in as BF16 when the per-tensor scale allows it, else F32 (or Q8_0 with ``lossy``).
* A plain checkpoint: ``plain_type`` = f32 | f16 | bf16 | q8_0 | q4_0 (the post-training-quantization baseline).
* Metadata, tensor names and transformations as ``shared/specs/gguf-gemma3.md``: norms +1 and F32, no
  ``output.weight`` (the head is tied), both RoPE bases, sliding window, rope scaling only when present.
* Multimodal checkpoints also give ``mmproj-<name>.gguf`` (clip, gemma3 projector) from the frozen vision tower.
* Streaming: tensor infos are declared first, then each tensor is converted in row chunks and written; peak
  memory stays near one chunk. The file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants

from gemma3_qat import __version__
from gemma3_qat.checkpoint import Checkpoint, atomic_file
from gemma3_qat.exporters.gguf_vocab import add_vocab, read_vocab
from gemma3_qat.formats import FP16_MAX, SFP8, FormatError, get_format, q4_0_blocks, sfp8_scale, sfp8_values_fit_bf16
from gemma3_qat.errors import InputError, OutputExistsError

T = GGMLQuantizationType
PLAIN_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}
EMBEDDING_TYPES = ("auto", "q4_0", "q8_0", "f16", "bf16", "f32")
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
              T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0}
CHUNK_ELEMENTS = 1 << 24  # rows per chunk are chosen so that a chunk holds about 16M weights (64 MB in fp32)
NAMESPACE = "gemma3_qat"  # our provenance keys

_TEXT_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_VISION_PREFIX = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?")
_PROJECTOR_PREFIX = re.compile(r"^(?:model\.)?multi_modal_projector\.")
_VISION_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


class ExportError(InputError):
    """A checkpoint or option combination the exporter cannot turn into a correct file."""


def text_gguf_name(hf_name: str) -> str | None:
    """GGUF name of a text-model tensor; None for tensors that are not written (the tied head) or not text."""
    if _VISION_PREFIX.match(hf_name) or _PROJECTOR_PREFIX.match(hf_name) or hf_name == "lm_head.weight":
        return None
    name = _TEXT_PREFIX.sub("", hf_name)
    if name == "embed_tokens.weight":
        return "token_embd.weight"
    if name == "norm.weight":
        return "output_norm.weight"
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ExportError(f"unexpected tensor {hf_name!r} in a Gemma 3 text model; is this a Gemma 3 checkpoint?")


def vision_gguf_name(hf_name: str) -> str | None:
    if _PROJECTOR_PREFIX.match(hf_name):
        name = _PROJECTOR_PREFIX.sub("", hf_name)
        return {"mm_input_projection_weight": "mm.input_projection.weight",
                "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight"}.get(name)
    if not _VISION_PREFIX.match(hf_name):
        return None
    name = _VISION_PREFIX.sub("", hf_name)
    fixed = {"embeddings.patch_embedding.weight": "v.patch_embd.weight",
             "embeddings.patch_embedding.bias": "v.patch_embd.bias",
             "embeddings.position_embedding.weight": "v.position_embd.weight",
             "post_layernorm.weight": "v.post_ln.weight", "post_layernorm.bias": "v.post_ln.bias"}
    if name in fixed:
        return fixed[name]
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _VISION_LAYER_NAMES:
        return f"v.blk.{m.group(1)}.{_VISION_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ExportError(f"unexpected vision tensor {hf_name!r}")


# ------------------------------------------------------------------------------------------------- planning


@dataclass
class TensorPlan:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # HF (torch) shape; GGUF's ne is its reverse
    ggml_type: GGMLQuantizationType
    encode: Callable[[torch.Tensor], np.ndarray]  # rows chunk (fp32) -> bytes or values in ggml_type's layout
    note: str = ""

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.shape)) // block * size


@dataclass
class ExportPlan:
    path: Path
    tensors: list[TensorPlan] = field(default_factory=list)
    file_type: LlamaFileType = LlamaFileType.ALL_F32
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _plain_encoder(ggml_type: GGMLQuantizationType, name: str, add_one: bool = False):
    def encode(rows: torch.Tensor) -> np.ndarray:
        x = rows.to(torch.float32)
        if add_one:
            x = x + 1.0
        if ggml_type == T.F32:
            return x.numpy()
        if ggml_type == T.F16:
            if x.numel() and float(x.abs().max()) > FP16_MAX:
                raise ExportError(f"{name} has values beyond fp16's range; export it as bf16 or f32")
            return x.to(torch.float16).numpy()
        if ggml_type == T.Q4_0:
            return q4_0_blocks(get_format("int4-block").quantize(x))
        return gguf_quants.quantize(x.numpy(), ggml_type)  # BF16 and Q8_0: the gguf package's reference rules
    return encode


def _format_encoder(fmt_name: str, tensor_scale: torch.Tensor | None, lossy: bool):
    fmt = get_format(fmt_name)
    if fmt_name in ("int4-block", "int4-channel"):
        return T.Q4_0, lambda rows: q4_0_blocks(fmt.quantize(rows))
    assert isinstance(fmt, SFP8) and tensor_scale is not None
    if lossy:
        return T.Q8_0, lambda rows: gguf_quants.quantize(fmt.fake_quantize_values(rows, tensor_scale).numpy(), T.Q8_0)
    if sfp8_values_fit_bf16(tensor_scale):
        return T.BF16, lambda rows: fmt.fake_quantize_values(rows, tensor_scale).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return T.F32, lambda rows: fmt.fake_quantize_values(rows, tensor_scale).numpy()


def _row_chunks(ckpt: Checkpoint, name: str) -> Iterator[torch.Tensor]:
    shape = ckpt.shape(name)
    if len(shape) < 2:
        yield ckpt.read(name).to(torch.float32)
        return
    step = max(1, CHUNK_ELEMENTS // int(np.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield ckpt.read(name, slice(start, min(start + step, shape[0]))).to(torch.float32)


def _tensor_sfp8_scale(ckpt: Checkpoint, name: str) -> torch.Tensor:
    maxabs = torch.zeros(())
    for rows in _row_chunks(ckpt, name):
        maxabs = torch.maximum(maxabs, torch.maximum(rows.amax(), -rows.amin()))
    return sfp8_scale(maxabs.reshape(1, 1))


def _is_matmul(gguf_name: str) -> bool:
    return re.match(r"^blk\.\d+\.(attn_[qkv]|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$", gguf_name) is not None


def plan_text_export(ckpt: Checkpoint, path: Path, *, plain_type: str | None = None,
                     embedding_type: str = "auto", lossy: bool = False) -> ExportPlan:
    """Decide name, type and encoder of every text tensor; reads only headers (and, for sfp8, each tensor's max)."""
    if embedding_type not in EMBEDDING_TYPES:
        raise ExportError(f"unknown --embedding-type {embedding_type!r}; choose one of: {', '.join(EMBEDDING_TYPES)}")
    qat = ckpt.qat
    if qat is not None and plain_type is not None:
        raise ExportError(f"{ckpt.path} is a QAT checkpoint ({qat.format}): its types come from qat.json; drop --type")
    if qat is None:
        plain_type = plain_type or "f16"
        if plain_type not in PLAIN_TYPES:
            raise ExportError(f"unknown --type {plain_type!r}; choose one of: {', '.join(PLAIN_TYPES)}")
    if lossy and (qat is None or qat.format != "sfp8"):
        raise ExportError("--lossy only applies to sfp8 checkpoints (Q8_0 instead of exact BF16/F32 values)")
    plan = ExportPlan(path)
    body_type = None
    for hf_name in ckpt.names():
        gguf_name = text_gguf_name(hf_name)
        if gguf_name is None:
            continue
        shape = ckpt.shape(hf_name)
        if len(shape) == 1:  # norms: F32, and Gemma's (1 + w) folded in
            plan.tensors.append(TensorPlan(gguf_name, hf_name, shape, T.F32,
                                           _plain_encoder(T.F32, hf_name, add_one=hf_name.endswith("norm.weight"))))
            continue
        is_embedding = gguf_name == "token_embd.weight"
        trained = qat is not None and (_is_matmul(gguf_name) or (is_embedding and qat.quantize_embeddings))
        if trained:
            try:
                get_format(qat.format).check_shape(shape)
            except FormatError as e:
                raise ExportError(f"{hf_name}: {e}") from None
            scale = _tensor_sfp8_scale(ckpt, hf_name) if qat.format == "sfp8" else None
            ggml_type, encode = _format_encoder(qat.format, scale, lossy)
            note = f"{qat.format} codes" if qat.format != "sfp8" else f"sfp8 values (scale {float(scale):.6g})"
        else:
            if is_embedding:
                chosen = embedding_type if embedding_type != "auto" else (
                    plain_type if plain_type in ("f32", "f16", "bf16") else "q8_0")
            else:
                chosen = plain_type
            ggml_type = PLAIN_TYPES[chosen]
            encode, note = _plain_encoder(ggml_type, hf_name), "converted"
        if ggml_type in (T.Q4_0, T.Q8_0) and shape[1] % 32:
            raise ExportError(f"{hf_name}: shape {shape} has rows that are not a multiple of 32, which "
                              f"{ggml_type.name} needs; keep it in f16, bf16 or f32")
        if _is_matmul(gguf_name):
            body_type = ggml_type
        plan.tensors.append(TensorPlan(gguf_name, hf_name, shape, ggml_type, encode, note))
    names = [t.gguf_name for t in plan.tensors]
    if "token_embd.weight" not in names:
        raise ExportError(f"{ckpt.path} has no embedding (embed_tokens.weight): not a complete Gemma 3 checkpoint")
    plan.file_type = FILE_TYPES.get(body_type, LlamaFileType.ALL_F32)
    if qat is not None and qat.format == "int4-channel":
        plan.notes.append("int4-channel is stored as Q4_0 with each row's scale in every block: exact, but 4.5 "
                          "bits per weight in GGUF (the 4-bit saving needs compressed-tensors or gemma.cpp)")
    if qat is not None and qat.format == "sfp8" and not lossy:
        plan.notes.append("GGUF has no SFP type: sfp8 weights are written as their exact values (BF16 where the "
                          "tensor scale allows, else F32); --lossy writes Q8_0 instead")
    return plan


# ------------------------------------------------------------------------------------------------- writing


class _Chunked:
    """Duck-typed array for ``GGUFWriter.write_tensor_data``: streams its chunks to the file."""

    def __init__(self, nbytes: int, chunks: Iterator[np.ndarray]):
        self.nbytes = nbytes
        self._chunks = chunks

    def tofile(self, fout) -> None:
        written = 0
        for chunk in self._chunks:
            chunk = np.ascontiguousarray(chunk)
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != self.nbytes:
            raise ExportError(f"internal error: wrote {written} bytes for a tensor of {self.nbytes}")


def _rope(text_config: dict) -> tuple[float, float, dict | None]:
    params = text_config.get("rope_parameters") or {}
    full = params.get("full_attention", {}) if isinstance(params, dict) else {}
    local = params.get("sliding_attention", {}) if isinstance(params, dict) else {}
    theta = full.get("rope_theta", text_config.get("rope_theta", 1_000_000.0))
    theta_local = local.get("rope_theta", text_config.get("rope_local_base_freq", 10_000.0))
    scaling = text_config.get("rope_scaling")
    if full.get("rope_type", "default") != "default":
        scaling = full
    return float(theta), float(theta_local), scaling


def _add_text_metadata(writer: GGUFWriter, ckpt: Checkpoint, plan: ExportPlan, name: str) -> None:
    import gguf

    c = ckpt.text_config
    writer.add_name(name)
    n_params = sum(int(np.prod(t.shape)) for t in plan.tensors)
    writer.add_size_label(gguf.utility.model_weight_count_rounded_notation(n_params))
    writer.add_file_type(plan.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.get("max_position_embeddings", 131_072))
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c.get("num_key_value_heads", c["num_attention_heads"]))
    head_dim = c.get("head_dim", 256)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    theta, theta_local, scaling = _rope(c)
    writer.add_rope_freq_base(theta)
    writer.add_rope_freq_base_swa(theta_local)
    writer.add_sliding_window(c.get("sliding_window", 4096))
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    if c.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(c["final_logit_softcapping"])
    qat = ckpt.qat
    writer.add_string(f"{NAMESPACE}.version", __version__)
    writer.add_string(f"{NAMESPACE}.format", qat.format if qat else "none (post-training conversion)")
    if qat:
        writer.add_uint32(f"{NAMESPACE}.steps", qat.steps)
        writer.add_bool(f"{NAMESPACE}.quantize_embeddings", qat.quantize_embeddings)
        if qat.teacher:
            writer.add_string(f"{NAMESPACE}.teacher", qat.teacher)


def _write(plan: ExportPlan, ckpt: Checkpoint, arch: str, add_metadata: Callable[[GGUFWriter], None],
           force: bool, log: Callable[[str], None]) -> None:
    with atomic_file(plan.path, force=force) as tmp:
        writer = GGUFWriter(tmp, arch)
        add_metadata(writer)
        for t in plan.tensors:
            raw = None if t.ggml_type in (T.F32, T.F16) else t.ggml_type
            dtype = {T.F32: np.float32, T.F16: np.float16}.get(t.ggml_type, np.uint8)
            shape = t.shape if raw is None else (*t.shape[:-1], t.shape[-1] // GGML_QUANT_SIZES[t.ggml_type][0]
                                                 * GGML_QUANT_SIZES[t.ggml_type][1])
            writer.add_tensor_info(t.gguf_name, shape, np.dtype(dtype), t.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(plan.tensors):
            chunks = (t.encode(rows) for rows in _row_chunks(ckpt, t.hf_name))
            writer.write_tensor_data(_Chunked(t.nbytes, chunks))
            if log and (i + 1) % 50 == 0:
                log(f"  {i + 1}/{len(plan.tensors)} tensors")
        writer.close()


def export_gguf(checkpoint: str | Path, output: str | Path | None = None, *, plain_type: str | None = None,
                embedding_type: str = "auto", lossy: bool = False, force: bool = False, dry_run: bool = False,
                model_card: bool = True, log: Callable[[str], None] | None = print) -> ExportPlan:
    """Export ``checkpoint`` to GGUF (and ``mmproj-*.gguf`` for multimodal checkpoints). Returns the text plan.

    ``plain_type``: for a plain (non-QAT) checkpoint, f32 | f16 | bf16 | q8_0 | q4_0. ``embedding_type``: for an
    embedding that was not trained quantized; ``auto`` = Q8_0 (llama.cpp's QAT choice; F16 costs +0.8-1.6 GB on
    the released sizes), or the plain type when that is f32/f16/bf16.
    """
    ckpt = Checkpoint(checkpoint)
    ckpt.require_tokenizer_model()
    name = ckpt.path.name
    if output is None:
        suffix = ckpt.qat.format if ckpt.qat else (plain_type or "f16")
        output = ckpt.path / f"{name}-{suffix}.gguf"
    output = Path(output)
    plan = plan_text_export(ckpt, output, plain_type=plain_type, embedding_type=embedding_type, lossy=lossy)
    embedding_rows = next(t.shape[0] for t in plan.tensors if t.gguf_name == "token_embd.weight")
    vocab = read_vocab(ckpt.path, embedding_rows)
    mmproj_plan = plan_mmproj_export(ckpt, output.with_name(f"mmproj-{output.name}")) if ckpt.multimodal else None
    if dry_run:
        return plan
    for p in (plan, mmproj_plan):
        if p is not None and p.path.exists() and not force:
            raise OutputExistsError(f"{p.path} already exists; pass --force to replace it")

    def metadata(writer):
        _add_text_metadata(writer, ckpt, plan, name)
        add_vocab(writer, vocab)

    _write(plan, ckpt, "gemma3", metadata, force, log)
    if mmproj_plan is not None:
        _write(mmproj_plan, ckpt, "clip", lambda w: _add_mmproj_metadata(w, ckpt, name), force, log)
    if model_card:
        write_model_card(ckpt, plan, mmproj_plan)
    return plan


def write_model_card(ckpt: Checkpoint, plan: ExportPlan, mmproj_plan: ExportPlan | None) -> Path:
    qat = ckpt.qat
    lines = [f"# {plan.path.name}", "", f"GGUF for llama.cpp / Ollama / LM Studio, written by gemma3-qat {__version__}.", ""]
    lines += [f"- base checkpoint: `{ckpt.path}`"]
    if qat:
        lines += [f"- quantization-aware training: format `{qat.format}`, {qat.steps} steps, teacher "
                  f"`{qat.teacher}`, KD `{qat.kd}`", f"- data: {', '.join(qat.data) or 'n/a'}",
                  f"- embedding trained quantized: {qat.quantize_embeddings}"]
        for k, v in qat.metrics.items():
            lines.append(f"- {k}: {v}")
    else:
        lines.append("- post-training conversion (no QAT)")
    types: dict[str, int] = {}
    for t in plan.tensors:
        types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + t.nbytes
    lines += ["", "| type | tensor bytes |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in types.items()]
    lines += [""] + [f"Note: {n}" for n in plan.notes]
    if mmproj_plan is not None:
        lines.append(f"Vision: `{mmproj_plan.path.name}` (frozen, unquantized SigLIP tower and projector).")
    card = plan.path.with_suffix(".md")
    with atomic_file(card, force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return card


# ------------------------------------------------------------------------------------------------- mmproj


def plan_mmproj_export(ckpt: Checkpoint, path: Path) -> ExportPlan:
    plan = ExportPlan(path, file_type=LlamaFileType.MOSTLY_F16)
    for hf_name in ckpt.names():
        gguf_name = vision_gguf_name(hf_name)
        if gguf_name is None:
            continue
        shape = ckpt.shape(hf_name)
        f32 = len(shape) == 1 or gguf_name in ("v.patch_embd.weight", "v.position_embd.weight")
        ggml_type = T.F32 if f32 else T.F16
        add_one = gguf_name == "mm.soft_emb_norm.weight"  # Gemma RMSNorm; the SigLIP LayerNorms get no shift
        plan.tensors.append(TensorPlan(gguf_name, hf_name, shape, ggml_type, _plain_encoder(ggml_type, hf_name, add_one)))
    return plan


def _add_mmproj_metadata(writer: GGUFWriter, ckpt: Checkpoint, name: str) -> None:
    v = ckpt.config.get("vision_config", {})
    writer.add_type("mmproj")
    writer.add_name(f"mmproj-{name}")
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("gemma3")
    writer.add_vision_use_gelu(True)
    writer.add_vision_projection_dim(ckpt.text_config["hidden_size"])
    writer.add_vision_image_size(v.get("image_size", 896))
    writer.add_vision_patch_size(v.get("patch_size", 14))
    writer.add_vision_embedding_length(v.get("hidden_size", 1152))
    writer.add_vision_feed_forward_length(v.get("intermediate_size", 4304))
    writer.add_vision_block_count(v.get("num_hidden_layers", 27))
    writer.add_vision_head_count(v.get("num_attention_heads", 16))
    writer.add_vision_attention_layernorm_eps(v.get("layer_norm_eps", 1e-6))
    pre = {}
    for fname in ("preprocessor_config.json", "processor_config.json"):
        if (ckpt.path / fname).exists():
            pre = json.loads((ckpt.path / fname).read_text())
            pre = pre.get("image_processor", pre)
            break
    writer.add_vision_image_mean(pre.get("image_mean", [0.5, 0.5, 0.5]))
    writer.add_vision_image_std(pre.get("image_std", [0.5, 0.5, 0.5]))
    patches = v.get("image_size", 896) // v.get("patch_size", 14)
    tokens_per_side = int(round(ckpt.config.get("mm_tokens_per_image", 256) ** 0.5))
    scale_factor = patches // tokens_per_side
    if scale_factor != 4:
        writer.add_vision_projector_scale_factor(scale_factor)


# ------------------------------------------------------------------------------------------------- inspect


def inspect_gguf(path: str | Path) -> dict:
    """Metadata (long arrays summarised), tensor table and totals of a GGUF file."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(path))
    metadata = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if fld.types and fld.types[0] == GGUFValueType.ARRAY:
            n = len(fld.data)
            metadata[key] = f"[array of {n}]" if n > 8 else fld.contents()
        else:
            metadata[key] = fld.contents()
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape[::-1]],
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t["type"]] = by_type.get(t["type"], 0) + t["bytes"]
    return {"path": str(path), "file_bytes": Path(path).stat().st_size, "metadata": metadata, "tensors": tensors,
            "tensor_bytes": sum(t["bytes"] for t in tensors), "bytes_by_type": by_type}
