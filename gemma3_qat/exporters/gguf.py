"""Export a Gemma 3 checkpoint to GGUF for llama.cpp, in pure Python with the ``gguf`` package.

* A QAT checkpoint (``qat.json``): int4-block / int4-channel matmul weights become Q4_0 **from the trained codes
  and scales** (the per-channel scale repeated in each block of its row), computed by ``gemma3_qat.formats`` from
  the latent weights exactly as the training forward did; never re-derived by another quantizer. sfp8 has no GGUF
  type: its exact values go in as BF16 when the per-tensor scale allows it, else F32 (or Q8_0 with ``lossy``).
  The llama.cpp lattices (q4_k, q6_k, q5_0, q8_0-lattice) go in as their own type; a mixture (q4_k_m) writes each
  tensor in the lattice qat.json records for it (llama-quantize Q4_K_M's type: ``gemma3_qat.mixtures``).
  The planner asks the format object for that encoding (``fmt.gguf_encoding``) and ``layout`` for
  names, roles and the type of everything else (``GGUFTypes``, which the memory model uses too).
* A plain checkpoint: ``plain_type`` = f32 | f16 | bf16 | q8_0 | q4_0 (the post-training-quantization baseline).
* Metadata, tensor names and transformations as ``docs/specs/gguf-gemma3.md``: norms +1 and F32, no
  ``output.weight`` (the head is tied), both RoPE bases, sliding window, rope scaling only when present.
* Multimodal checkpoints also give ``mmproj-<name>.gguf`` (clip, gemma3 projector) from the frozen vision tower.
* Streaming: tensor infos are declared first, then each tensor is converted in row chunks and written; peak
  memory stays near one chunk. The file is written to a temporary name and renamed when complete; every file
  (GGUF, mmproj, model card) is checked against the overwrite rule before the first is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from gemma3_qat import __version__
from gemma3_qat.checkpoint import Checkpoint, atomic_file, check_output
from gemma3_qat.exporters.gguf_vocab import add_vocab, read_vocab
from gemma3_qat.layout import (
    ExportError,
    MATMUL_ROLES,
    GGUFTypes,
    check_rows,
    tensor_role,
    text_gguf_name,
    vision_gguf_name,
)
from gemma3_qat.formats import FormatError, encode_values, get_format

T = GGMLQuantizationType
NAMESPACE = "gemma3_qat"  # our provenance keys


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

    def rows(self) -> list[TensorPlan]:
        return self.tensors


def _plain_encoder(ggml_type: GGMLQuantizationType, name: str, add_one: bool = False):
    def encode(rows: torch.Tensor) -> np.ndarray:
        x = rows.to(torch.float32)
        if add_one:
            x = x + 1.0
        try:
            return encode_values(x, ggml_type)
        except FormatError as e:  # e.g. values beyond fp16's range
            raise ExportError(f"{name}: {e}") from None
    return encode


def gguf_types_of(ckpt: Checkpoint, *, plain_type: str | None = None, embedding_type: str = "auto",
                  lossy: bool = False) -> GGUFTypes:
    """The type policy of exporting ``ckpt`` with these options (validates them)."""
    qat = ckpt.qat
    if qat is not None and plain_type is not None:
        raise ExportError(f"{ckpt.path} is a QAT checkpoint ({qat.format}): its types come from qat.json; "
                          "drop --type")
    return GGUFTypes(get_format(qat.format) if qat else None, plain_type,
                     quantize_embeddings=bool(qat and qat.quantize_embeddings), embedding_type=embedding_type,
                     lossy=lossy, lattices=ckpt.trained_formats() if qat else None)


def plan_text_export(ckpt: Checkpoint, path: Path, *, plain_type: str | None = None,
                     embedding_type: str = "auto", lossy: bool = False) -> ExportPlan:
    """Decide name, type and encoder of every text tensor; reads only headers (and, for a format with a
    per-tensor scale, each trained tensor's max |w|)."""
    types = gguf_types_of(ckpt, plain_type=plain_type, embedding_type=embedding_type, lossy=lossy)
    fmt = types.format
    plan = ExportPlan(path)
    body_type = None
    for hf_name in ckpt.names():
        gguf_name = text_gguf_name(hf_name)
        if gguf_name is None:
            continue
        role, shape = tensor_role(hf_name), ckpt.shape(hf_name)
        if role == "norms":  # F32, and Gemma's (1 + w) folded in
            plan.tensors.append(TensorPlan(gguf_name, hf_name, shape, T.F32,
                                           _plain_encoder(T.F32, hf_name, add_one=hf_name.endswith("norm.weight"))))
            continue
        trained = types.format_of(role, hf_name)  # the tensor's lattice: a mixture's differ by tensor
        if trained is not None:
            try:
                trained.check_shape(shape)
            except FormatError as e:
                raise ExportError(f"{hf_name}: {e}") from None
            scale = trained.tensor_scale(ckpt.max_abs(hf_name)) if trained.granularity == "tensor" else None
            encoding = trained.gguf_encoding(lossy=lossy, tensor_scale=scale)
            ggml_type, encode, note = encoding.ggml_type, encoding.encode, encoding.note
        else:
            ggml_type = types.ggml_type(role, gguf_name, shape, hf_name=hf_name)
            encode, note = _plain_encoder(ggml_type, hf_name), "converted"
        check_rows(ggml_type, hf_name, shape)
        if role in MATMUL_ROLES:
            body_type = ggml_type
        plan.tensors.append(TensorPlan(gguf_name, hf_name, shape, ggml_type, encode, note))
    names = [t.gguf_name for t in plan.tensors]
    if "token_embd.weight" not in names:
        raise ExportError(f"{ckpt.path} has no embedding (embed_tokens.weight): not a complete Gemma 3 checkpoint")
    plan.file_type = types.file_type(body_type)
    note = fmt.gguf_note(lossy=lossy) if fmt is not None else None
    if note:
        plan.notes.append(note)
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


def _add_text_metadata(writer: GGUFWriter, ckpt: Checkpoint, plan: ExportPlan, name: str) -> None:
    import gguf

    from gemma3_qat.models import FULL, SLIDING

    arch = ckpt.architecture
    writer.add_name(name)
    n_params = sum(int(np.prod(t.shape)) for t in plan.tensors)
    writer.add_size_label(gguf.utility.model_weight_count_rounded_notation(n_params))
    writer.add_file_type(plan.file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(arch.context)
    writer.add_embedding_length(arch.hidden)
    writer.add_block_count(arch.layers)
    writer.add_feed_forward_length(arch.ffn)
    writer.add_head_count(arch.heads)
    writer.add_head_count_kv(arch.kv_heads)
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_layer_norm_rms_eps(arch.rms_norm_eps)
    writer.add_rope_freq_base(arch.rope_base(FULL))
    writer.add_rope_freq_base_swa(arch.rope_base(SLIDING))
    writer.add_sliding_window(arch.sliding_window)
    if arch.rope_scaling_factor:  # linear, on the global layers
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(arch.rope_scaling_factor))
    if arch.final_logit_softcapping:
        writer.add_final_logit_softcapping(arch.final_logit_softcapping)
    qat = ckpt.qat
    writer.add_string(f"{NAMESPACE}.version", __version__)
    writer.add_string(f"{NAMESPACE}.format", qat.format if qat else "none (post-training conversion)")
    if qat:
        writer.add_uint32(f"{NAMESPACE}.steps", qat.steps)
        writer.add_bool(f"{NAMESPACE}.quantize_embeddings", qat.quantize_embeddings)
        if qat.teacher:
            writer.add_string(f"{NAMESPACE}.teacher", qat.teacher)
        recovered = qat.metrics.get("recovered_lattice")
        if recovered:  # `gemma3-qat import`: which blocks came back exactly, for inspect
            writer.add_string(f"{NAMESPACE}.recovered_lattice",
                              f"{recovered['on_lattice']}/{recovered['groups']} {recovered['format']} groups from "
                              f"{recovered['source']} (tie rule {recovered['rule']}, {recovered['several_scales']} "
                              "with several consistent scales)")


def _write(plan: ExportPlan, ckpt: Checkpoint, arch: str, add_metadata: Callable[[GGUFWriter], None],
           force: bool, log: Callable[[str], None]) -> None:
    with atomic_file(plan.path, force=force, make_parents=False) as tmp:
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
            chunks = (t.encode(rows) for rows in ckpt.row_chunks(t.hf_name))
            writer.write_tensor_data(_Chunked(t.nbytes, chunks))
            if log and (i + 1) % 50 == 0:
                log(f"  {i + 1}/{len(plan.tensors)} tensors")
        writer.close()


def export_gguf(checkpoint: str | Path, output: str | Path | None = None, *, plain_type: str | None = None,
                embedding_type: str | None = "auto", lossy: bool = False, force: bool = False, dry_run: bool = False,
                model_card: bool = True, log: Callable[[str], None] | None = print) -> ExportPlan:
    """Export ``checkpoint`` to GGUF (and ``mmproj-*.gguf`` for multimodal checkpoints). Returns the text plan.

    ``plain_type``: for a plain (non-QAT) checkpoint, f32 | f16 | bf16 | q8_0 | q4_0. ``embedding_type``: for an
    embedding that was not trained quantized; ``auto`` = Q8_0 (llama.cpp's QAT choice; F16 costs +0.8-1.6 GB on
    the released sizes), or the plain type when that is f32/f16/bf16 (None: auto). ``dry_run``: plan only, write
    nothing.

    Every file written (the GGUF, its mmproj, the model card ``<output>.md``) obeys the same rule: refused if it
    exists without ``force`` or is a directory, or if its parent does not exist; all are checked before the
    first byte is written.
    """
    embedding_type = embedding_type or "auto"
    ckpt = Checkpoint(checkpoint, verify=not dry_run)  # a dry run checks sizes and headers, not checksums
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
    outputs = [p.path for p in (plan, mmproj_plan) if p is not None] + ([model_card_path(plan)] if model_card else [])
    for path in outputs:
        check_output(path, force=force, make_parents=False)

    def metadata(writer):
        _add_text_metadata(writer, ckpt, plan, name)
        add_vocab(writer, vocab)

    _write(plan, ckpt, "gemma3", metadata, force, log)
    if mmproj_plan is not None:
        _write(mmproj_plan, ckpt, "clip", lambda w: _add_mmproj_metadata(w, ckpt, name), force, log)
    if model_card:
        write_model_card(ckpt, plan, mmproj_plan, force=True)  # checked above with the rest
    return plan


def model_card_path(plan: ExportPlan) -> Path:
    """The model card written next to the GGUF: ``x.gguf`` -> ``x.md`` (``x.md`` itself -> ``x.md.md``)."""
    path = plan.path
    return path.with_suffix(".md") if path.suffix != ".md" else path.with_name(path.name + ".md")


def write_model_card(ckpt: Checkpoint, plan: ExportPlan, mmproj_plan: ExportPlan | None, *,
                     force: bool = False) -> Path:
    """Write ``model_card_path(plan)``: provenance, tensor bytes by type and the plan's notes."""
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
    card = model_card_path(plan)
    with atomic_file(card, force=force, make_parents=False) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return card


# ------------------------------------------------------------------------------------------------- mmproj


def plan_mmproj_export(ckpt: Checkpoint, path: Path) -> ExportPlan:
    plan = ExportPlan(path, file_type=LlamaFileType.MOSTLY_F16)
    types = GGUFTypes()  # the vision tower is frozen and unquantized: F16 matrices, F32 vectors
    for hf_name in ckpt.names():
        gguf_name = vision_gguf_name(hf_name)
        if gguf_name is None:
            continue
        shape = ckpt.shape(hf_name)
        ggml_type = types.ggml_type(tensor_role(hf_name), gguf_name, shape)
        add_one = gguf_name == "mm.soft_emb_norm.weight"  # Gemma RMSNorm; the SigLIP LayerNorms get no shift
        plan.tensors.append(TensorPlan(gguf_name, hf_name, shape, ggml_type, _plain_encoder(ggml_type, hf_name, add_one)))
    return plan


def _add_mmproj_metadata(writer: GGUFWriter, ckpt: Checkpoint, name: str) -> None:
    arch = ckpt.architecture
    v = arch.vision
    writer.add_type("mmproj")
    writer.add_name(f"mmproj-{name}")
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("gemma3")
    writer.add_vision_use_gelu(True)
    writer.add_vision_projection_dim(arch.hidden)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden)
    writer.add_vision_feed_forward_length(v.ffn)
    writer.add_vision_block_count(v.layers)
    writer.add_vision_head_count(v.heads)
    writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    pre = {}
    for fname in ("preprocessor_config.json", "processor_config.json"):
        if (ckpt.path / fname).exists():
            pre = json.loads((ckpt.path / fname).read_text())
            pre = pre.get("image_processor", pre)
            break
    writer.add_vision_image_mean(pre.get("image_mean", [0.5, 0.5, 0.5]))
    writer.add_vision_image_std(pre.get("image_std", [0.5, 0.5, 0.5]))
    tokens_per_side = int(round(v.tokens_per_image ** 0.5))
    scale_factor = (v.image_size // v.patch_size) // tokens_per_side
    if scale_factor != 4:
        writer.add_vision_projector_scale_factor(scale_factor)
