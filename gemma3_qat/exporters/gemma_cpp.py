"""Export a Gemma 3 checkpoint to gemma.cpp's single-file ``.sbs``: SFP8 at 8 bits in its own runtime.

* An sfp8 QAT checkpoint: every language-model matmul is written as SFP **from ``formats.py``'s codes of the
  latent weight and its trained per-tensor scale**, exactly what the training forward computed with. gemma.cpp
  keeps one scale per stored tensor, so the matmuls go in its split forms, one HF tensor each: ``qkv1_w`` (q),
  ``gating1_w`` (gate), ``gating2_w`` (up), ``linear_w`` (down), ``att_w`` (o, as is). K and V share
  ``qkv2_w`` (interleaved per kv head), which holds one scale: when their trained scales differ (only when a
  tensor's max |w| exceeds 1.875), that tensor is written as its exact trained values (BF16 when both scales
  allow, else F32) instead, and the plan says so. The embedding is SFP if it was trained quantized, else BF16.
* A plain checkpoint: ``type`` bf16 (the teacher as a reference; default) | f32 | sfp8 (the post-training
  baseline: formats.py's codes of each stored gemma.cpp tensor, one ``ScaleWeights`` scale each, as gemma.cpp's
  own converter scales them). int4 runs are refused: gemma.cpp has no Q4_0.
* Norms are F32 (exact; gemma.cpp reads them with scale 1 and applies ``1 + w`` itself, like HF), never SFP.
* The ``ModelConfig`` comes from the checkpoint's config with gemma.cpp's traps handled (spec §3 and the
  findings): model enum 15 (one of the four whose global layers use RoPE 1e6), a global layer's window equal to
  ``max_seq_len``, ``query_scale`` from ``query_pre_attn_scalar``, eos ids including ``<end_of_turn>``, wrapping
  PT or IT. What gemma.cpp cannot compute like transformers is refused naming the rule (dimensions that break
  its kernels, RoPE bases, norm eps, activations, attention scales) or noted (linear RoPE scaling).
* Streaming and atomic like the GGUF export: every blob size is known from the plan, each tensor is converted in
  row chunks and written; the file is renamed into place when complete. A model card goes next to it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gemma3_qat import __version__
from gemma3_qat.checkpoint import Checkpoint, atomic_file, check_output
from gemma3_qat.layout import ExportError, text_gguf_name
from gemma3_qat.exporters.sbs import (
    ELEMENT_BYTES,
    MODELS,
    QUERY_SCALE,
    TYPE_BITS,
    TYPES,
    WRAPPING,
    LayerConfig,
    MatRecord,
    ModelConfig,
    SbsWriter,
    expected_shapes,
    file_bytes_of,
    toc_bytes,
)
from gemma3_qat.formats import get_format, sfp8_values_fit_bf16
from gemma3_qat.models import Architecture
from gemma3_qat.report import PlanRow
from gemma3_qat.vocab import read_sentencepiece_vocab, sentencepiece_model_proto

PLAIN_TYPES = ("bf16", "f32", "sfp8")
GC_ROPE_LOCAL, GC_ROPE_GLOBAL = 10_000.0, 1_000_000.0  # hard-coded in gemma.cpp (activations.h)
GC_NORM_EPS = 1e-6
GC_BOS = 2  # hard-coded in gemma.cpp (tokenizer.h)
MAX_QKV_DIM = 1024  # kMaxQKVDim: larger aborts at load
MAX_MATMUL_K = 36864  # MMEntireA::kMaxK: a larger inner dimension aborts at the first MatMul
# qkv_dim must be a multiple of the f32 SIMD width (aligned loads in FlashAttention: a segfault otherwise):
# 8 lanes on AVX2 (the shared binaries), 16 on AVX-512 builds
QKV_LANES, QKV_LANES_AVX512 = 8, 16

# GGUF name (the one name mapping, exporters/layout.py) -> gemma.cpp name; {i} is the layer
_GC_NAMES = {"token_embd.weight": "c_embedding", "output_norm.weight": "c_final_norm",
             "attn_norm.weight": "pre_att_ns_{i}", "post_attention_norm.weight": "post_att_ns_{i}",
             "ffn_norm.weight": "pre_ff_ns_{i}", "post_ffw_norm.weight": "post_ff_ns_{i}",
             "attn_q_norm.weight": "query_norm_{i}", "attn_k_norm.weight": "key_norm_{i}",
             "attn_q.weight": "qkv1_w_{i}", "attn_output.weight": "att_w_{i}", "ffn_gate.weight": "gating1_w_{i}",
             "ffn_up.weight": "gating2_w_{i}", "ffn_down.weight": "linear_w_{i}"}
_KV = ("attn_k.weight", "attn_v.weight")  # both go into qkv2_w_{i}


class GemmaCppError(ExportError):
    """A checkpoint or option gemma.cpp cannot run as transformers computes it (the message names the rule)."""


@dataclass
class SbsTensor:
    """One tensor blob of the plan: its gemma.cpp record and where its bytes come from."""

    name: str
    type: str  # SFP | BF16 | F32
    rows: int
    cols: int
    sources: tuple[str, ...]  # the HF tensors it is built from
    scale: float = 1.0
    note: str = ""
    chunks: Callable[[Checkpoint], Iterator[bytes]] | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * ELEMENT_BYTES[self.type]

    def record(self) -> MatRecord:
        return MatRecord(self.name, self.type, self.rows, self.cols, self.scale)


@dataclass
class GemmaCppPlan:
    """What ``export_gemma_cpp`` writes (or, with ``dry_run``, would write)."""

    path: Path
    config: ModelConfig
    tensors: list[SbsTensor] = field(default_factory=list)
    tokenizer: bytes = b""
    notes: list[str] = field(default_factory=list)

    def metadata_blobs(self) -> list[tuple[str, bytes]]:
        return [("config", self.config.to_bytes()), ("tokenizer", self.tokenizer),
                ("toc", toc_bytes([t.record() for t in self.tensors]))]

    @property
    def nbytes(self) -> int:
        """Tensor bytes."""
        return sum(t.nbytes for t in self.tensors)

    def rows(self) -> list[PlanRow]:
        return [PlanRow(t.name, t.type, t.shape, t.nbytes, t.note) for t in self.tensors]

    @property
    def file_bytes(self) -> int:
        """The exact size of the file (tensors, metadata, 256-byte alignment, 64 KiB end padding, directory)."""
        return file_bytes_of([t.nbytes for t in self.tensors] + [len(b) for _, b in self.metadata_blobs()])

    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + t.nbytes
        return out


# ------------------------------------------------------------------------------------------------- encoders


def _encoder(kind: str, scale: torch.Tensor | None) -> Callable[[torch.Tensor], bytes]:
    """fp32 rows -> blob bytes. ``SFP``: formats.py's codes at ``scale``; ``BF16``/``F32``: the values (rounded
    to nearest even for BF16); ``BF16-values``/``F32-values``: formats.py's exact fake-quantized values."""
    fmt = get_format("sfp8")

    def encode(rows: torch.Tensor) -> bytes:
        if kind == "SFP":
            return fmt.quantize(rows, scale=scale).codes.numpy().tobytes()
        if kind.endswith("-values"):
            rows = fmt.fake_quantize_values(rows, scale=scale)
        if kind.startswith("BF16"):
            return rows.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        return rows.to(torch.float32).numpy().tobytes()
    return encode


def _stream(parts: list[tuple[str, slice | None, Callable[[torch.Tensor], bytes]]]):
    """A blob's chunks: the listed (HF tensor, row range, encoder) parts, concatenated in order."""
    def chunks(ckpt: Checkpoint) -> Iterator[bytes]:
        for name, rows, encode in parts:
            for chunk in ckpt.row_chunks(name, rows):
                yield encode(chunk)
    return chunks


# ------------------------------------------------------------------------------------------------- config


def _first_int(value) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _piece_id(tokenizer: bytes, piece: str) -> int | None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    i = sp.piece_to_id(piece)
    return i if sp.id_to_piece(i) == piece else None


def check_shapes(arch: Architecture, vocab: int, *, source: str = "checkpoint") -> list[str]:
    """Refuse (naming the rule) what gemma.cpp's kernels cannot run; return the notes for what it runs only on
    some builds. From the findings: MatMul output dims multiples of 4 (``kNR``; an abort), ``qkv_dim`` a
    multiple of the f32 SIMD width (a segfault), ``qkv_dim <= 1024``, MatMul inner dims <= 36864."""
    d, f, h, k, dh = arch.hidden, arch.ffn, arch.heads, arch.kv_heads, arch.head_dim
    outputs = {"num_attention_heads x head_dim": h * dh, "2 x num_key_value_heads x head_dim": 2 * k * dh,
               "intermediate_size": f, "hidden_size": d, "vocab_size (embedding rows)": vocab}
    for what, n in outputs.items():
        if n % 4:
            raise GemmaCppError(f"{source}: {what} = {n} is not a multiple of 4, which gemma.cpp's MatMul needs "
                                "for every output dimension (it aborts: N % kNR == 0); gemma.cpp cannot run it, "
                                "export --to gguf instead")
    if dh % QKV_LANES or dh > MAX_QKV_DIM:
        raise GemmaCppError(f"{source}: head_dim = {dh} must be a multiple of {QKV_LANES} (the AVX2 f32 vector "
                            f"length: gemma.cpp's attention segfaults otherwise) and at most {MAX_QKV_DIM}; "
                            "gemma.cpp cannot run it, export --to gguf instead")
    for what, n in {"hidden_size": d, "intermediate_size": f, "num_attention_heads x head_dim": h * dh}.items():
        if n > MAX_MATMUL_K:
            raise GemmaCppError(f"{source}: {what} = {n} exceeds gemma.cpp's MatMul inner-dimension limit "
                                f"{MAX_MATMUL_K}; export --to gguf instead")
    if dh % QKV_LANES_AVX512:
        return [f"head_dim {dh} is not a multiple of {QKV_LANES_AVX512}: fine for AVX2 builds of gemma.cpp, but "
                "AVX-512 builds need multiples of 16 (they segfault otherwise)"]
    return []


_PROVENANCE = re.compile(r"^(?P<name>.*):gemma3-qat:(?P<format>[\w-]+):(?P<steps>\d+|-)$")


def display_name(name: str, format: str | None, steps: int | None) -> str:
    """The config's ``display_name`` (free ASCII text for gemma.cpp): the checkpoint's name and our provenance,
    ``<name>:gemma3-qat:<format|none>:<steps|->``, which ``provenance`` reads back (evaluate's report rows)."""
    name = re.sub(r"[^\x21-\x7e]", "_", name)[:64] or "gemma3"
    return f"{name}:gemma3-qat:{format or 'none'}:{'-' if steps is None else steps}"


def provenance(config_display_name: str) -> tuple[str, int | None]:
    """(format, steps) from a ``display_name`` we wrote: ("none", None) for a plain export or a foreign file."""
    m = _PROVENANCE.match(config_display_name)
    if not m:
        return "none", None
    return m["format"], None if m["steps"] == "-" else int(m["steps"])


def model_config(ckpt: Checkpoint, *, vocab: int, weight: str, tokenizer: bytes, wrapping: str | None,
                 notes: list[str]) -> ModelConfig:
    """gemma.cpp's ``ModelConfig`` for ``ckpt``; refuses what gemma.cpp would compute differently from
    transformers (with the rule), appends to ``notes`` what it computes with a known, stated difference."""
    from gemma3_qat.models import FULL, SLIDING

    arch, src = ckpt.architecture, str(ckpt.path)
    notes += check_shapes(arch, vocab, source=src)
    d, h, dh = arch.hidden, arch.heads, arch.head_dim
    if arch.hidden_activation != "gelu_pytorch_tanh":
        raise GemmaCppError(f"{src}: hidden_activation {arch.hidden_activation!r}: gemma.cpp computes only the tanh "
                            "GELU (gelu_pytorch_tanh)")
    if abs(float(arch.rms_norm_eps) - GC_NORM_EPS) > 1e-12:
        raise GemmaCppError(f"{src}: rms_norm_eps {arch.rms_norm_eps}: gemma.cpp hard-codes 1e-6")
    if arch.attention_bias or arch.bidirectional_attention:
        raise GemmaCppError(f"{src}: attention biases / bidirectional attention: gemma.cpp's Gemma 3 has neither")
    if arch.bos_token_id != GC_BOS:
        raise GemmaCppError(f"{src}: bos_token_id {arch.bos_token_id}: gemma.cpp hard-codes BOS = {GC_BOS}")
    if not arch.tied_embeddings:
        raise GemmaCppError(f"{src}: an untied lm_head: gemma.cpp always computes the logits with the embedding")
    theta, theta_local = arch.rope_base(FULL), arch.rope_base(SLIDING)
    if (theta, theta_local) != (GC_ROPE_GLOBAL, GC_ROPE_LOCAL):
        raise GemmaCppError(f"{src}: RoPE bases {theta_local:g} (local) / {theta:g} (global): gemma.cpp hard-codes "
                            f"{GC_ROPE_LOCAL:g} / {GC_ROPE_GLOBAL:g}")
    if arch.rope_scaling_factor:
        # measured (tests/test_gemma_cpp.py::test_rope_scaling_has_no_field_and_its_drift_is_measured): the
        # embedded model with factor 8 set, 2,000 tokens: mean KL 1.2e-2 to 2.5e-2 per position bucket, top-1 ~91%
        notes.append(f"RoPE linear scaling factor {arch.rope_scaling_factor:g} on the global layers has no gemma.cpp "
                     "field: gemma.cpp rotates them at unscaled positions, so its logits differ from transformers' at "
                     "every position (on the embedded model with factor 8 set: mean KL ~2e-2 nats/token, top-1 ~91% "
                     "over 2,000 tokens); measure this checkpoint's drift with gemma3-qat eval FILE.sbs")
    if arch.query_scalar == dh:
        query_scale = QUERY_SCALE["sqrt_key_size"]
    elif arch.query_scalar == d // h:
        query_scale = QUERY_SCALE["sqrt_model_dim_div_num_heads"]
    else:
        raise GemmaCppError(f"{src}: query_pre_attn_scalar {arch.query_scalar}: gemma.cpp scales queries by "
                            f"1/sqrt(head_dim = {dh}) or 1/sqrt(hidden_size // heads = {d // h}) only")
    max_seq = arch.context
    window = min(arch.sliding_window, max_seq)
    # a global layer is recognised by a window equal to max_seq_len, exactly; HF's window counts the current
    # token, as gemma.cpp's does (the findings: 63 or 65 instead of 64 is 15-45x worse)
    windows = tuple(max_seq if t == FULL else window for t in arch.layer_types)
    layer = LayerConfig(d, arch.ffn, h, arch.kv_heads, dh)
    eos = arch.eos_token_ids[0]
    gen = ckpt.path / "generation_config.json"
    if gen.exists():
        import json

        eos = _first_int(json.loads(gen.read_text()).get("eos_token_id")) or eos
    end_of_turn = _piece_id(tokenizer, "<end_of_turn>")
    if wrapping is None:
        names = f"{ckpt.path.name} {(ckpt.qat.teacher if ckpt.qat else '') or ''}"
        wrapping = "it" if re.search(r"-it\b", names) else "pt"
    if wrapping not in ("pt", "it"):
        raise GemmaCppError(f"unknown wrapping {wrapping!r}; choose pt (BOS only) or it (the chat template)")
    if wrapping == "it" and (end_of_turn is None or _piece_id(tokenizer, "<start_of_turn>") is None):
        raise GemmaCppError(f"{src}: wrapping it needs <start_of_turn> / <end_of_turn> in tokenizer.model: "
                            "gemma.cpp's chat template tokenizes them; export with wrapping pt")
    qat = ckpt.qat
    name = display_name(ckpt.path.name, qat.format if qat else None, qat.steps if qat else None)
    return ModelConfig(name, MODELS[arch.gemma_cpp_identity()[0]], WRAPPING[wrapping], TYPES[weight], d, vocab,
                       max_seq, (layer,) * arch.layers, windows, query_scale=query_scale, eos_id=eos,
                       secondary_eos_id=end_of_turn if end_of_turn is not None else eos,
                       att_cap=float(arch.attn_logit_softcapping or 0.0),
                       final_cap=float(arch.final_logit_softcapping or 0.0))


# ------------------------------------------------------------------------------------------------- planning


def _tensor_types(ckpt: Checkpoint, type: str | None) -> tuple[str, str, bool]:
    """(matmul kind, embedding kind, trained): the types of one export, options validated."""
    qat = ckpt.qat
    if qat is not None:
        if type is not None:
            raise GemmaCppError(f"{ckpt.path} is a QAT checkpoint ({qat.format}): its types come from qat.json; "
                                "drop --type")
        if qat.format in ("int4-block", "int4-channel"):
            raise GemmaCppError(f"{ckpt.path} is an {qat.format} run: gemma.cpp has no int4 (Q4_0) type; export "
                                "it --to gguf (llama.cpp Q4_0) or --to safetensors --layout compressed-tensors "
                                "(vLLM)")
        if qat.format != "sfp8":
            raise GemmaCppError(f"{ckpt.path} is a {qat.format} run: gemma.cpp has none of its llama.cpp types "
                                f"({get_format(qat.format).gguf_type}); export it --to gguf")
        return "SFP", "SFP" if qat.quantize_embeddings else "BF16", True
    type = type or "bf16"
    if type not in PLAIN_TYPES:
        raise GemmaCppError(f"unknown --type {type!r} for --to gemma-cpp; choose one of: {', '.join(PLAIN_TYPES)}")
    body = {"bf16": "BF16", "f32": "F32", "sfp8": "SFP"}[type]
    return body, "BF16" if body == "SFP" else body, False


def plan_gemma_cpp(ckpt: Checkpoint, path: Path, *, type: str | None = None, wrapping: str | None = None,
                   tokenizer: bytes) -> GemmaCppPlan:
    """Decide every blob (name, type, shape, scale, source); reads headers and, for SFP, each tensor's max |w|."""
    body, emb_kind, trained = _tensor_types(ckpt, type)
    fmt = get_format("sfp8")
    by_gguf: dict[str, str] = {}
    for hf in ckpt.names():
        g = text_gguf_name(hf)
        if g is not None:
            by_gguf[g] = hf
    if "token_embd.weight" not in by_gguf:
        raise GemmaCppError(f"{ckpt.path} has no embedding (embed_tokens.weight): not a complete Gemma 3 checkpoint")
    notes: list[str] = []
    scales: dict[str, torch.Tensor] = {}

    def scale_of(*hf: str) -> torch.Tensor:  # ScaleWeights over the named HF tensors together
        key = "+".join(hf)
        if key not in scales:
            scales[key] = fmt.tensor_scale(torch.stack([ckpt.max_abs(n) for n in hf]).amax())
        return scales[key]

    def plain(name: str, hf: str, kind: str, note: str) -> SbsTensor:
        shape = ckpt.shape(hf)
        rows, cols = (1, shape[0]) if len(shape) == 1 else (shape[0], int(np.prod(shape[1:])))
        if kind == "SFP":
            s = scale_of(hf)
            return SbsTensor(name, "SFP", rows, cols, (hf,), float(s), note or f"sfp8 codes, scale {float(s):.6g}",
                             _stream([(hf, None, _encoder("SFP", s))]))
        return SbsTensor(name, kind, rows, cols, (hf,), 1.0, note, _stream([(hf, None, _encoder(kind, None))]))

    tensors = []
    layers = sorted({int(m.group(1)) for g in by_gguf if (m := re.match(r"blk\.(\d+)\.", g))})
    for g in ("token_embd.weight", "output_norm.weight"):
        if g in by_gguf:
            kind = emb_kind if g == "token_embd.weight" else "F32"
            note = ("trained sfp8 codes" if trained and kind == "SFP" else
                    "not trained quantized: BF16" if trained else "")
            tensors.append(plain(_GC_NAMES[g], by_gguf[g], kind, note))
    dh = ckpt.architecture.head_dim
    for i in layers:
        for suffix, gc in _GC_NAMES.items():
            g = f"blk.{i}.{suffix}"
            if g not in by_gguf or suffix in ("token_embd.weight", "output_norm.weight"):
                continue
            is_norm = suffix.endswith("norm.weight")
            tensors.append(plain(gc.format(i=i), by_gguf[g], "F32" if is_norm else body,
                                 "trained sfp8 codes" if trained and not is_norm else ""))
        k_hf, v_hf = (by_gguf.get(f"blk.{i}.{s}") for s in _KV)
        if k_hf is None or v_hf is None:
            raise GemmaCppError(f"{ckpt.path}: layer {i} lacks k_proj or v_proj: not a complete Gemma 3 checkpoint")
        tensors.append(_kv_tensor(ckpt, i, k_hf, v_hf, dh, body, trained, scale_of, notes))
    expected = 2 + 12 * len(layers)  # per layer: 6 norms + q, kv, o, gate, up, down
    if len(tensors) != expected or not layers:
        raise GemmaCppError(f"{ckpt.path}: found {len(tensors)} of the {expected} tensors a {len(layers)}-layer "
                            "Gemma 3 text model has; not a complete Gemma 3 checkpoint")
    weight = min((t.type for t in tensors), key=lambda t: TYPE_BITS[t])
    vocab = ckpt.shape(by_gguf["token_embd.weight"])[0]
    config = model_config(ckpt, vocab=vocab, weight=weight, tokenizer=tokenizer, wrapping=wrapping, notes=notes)
    if ckpt.multimodal:
        notes.append("text model only: the vision tower and projector are not in the file (gemma.cpp's Gemma 3 "
                     "vision path was not verified to compute like transformers); use --to gguf for images")
    return GemmaCppPlan(path, config, tensors, tokenizer, notes)


def _kv_tensor(ckpt, i, k_hf, v_hf, dh, body, trained, scale_of, notes) -> SbsTensor:
    """``qkv2_w_i``: for each kv head, its K rows then its V rows (gemma.cpp's KV cache layout), one scale."""
    k_rows, cols = ckpt.shape(k_hf)
    heads = k_rows // dh
    name = f"qkv2_w_{i}"

    def parts(encode_k, encode_v):
        out = []
        for h in range(heads):
            rows = slice(h * dh, (h + 1) * dh)
            out += [(k_hf, rows, encode_k), (v_hf, rows, encode_v)]
        return _stream(out)

    if body != "SFP":
        enc = _encoder(body, None)
        return SbsTensor(name, body, 2 * k_rows, cols, (k_hf, v_hf), 1.0, "", parts(enc, enc))
    if not trained:  # the PTQ baseline: one ScaleWeights scale over the stored tensor, as gemma.cpp's converter
        s = scale_of(k_hf, v_hf)
        enc = _encoder("SFP", s)
        return SbsTensor(name, "SFP", 2 * k_rows, cols, (k_hf, v_hf), float(s), f"sfp8 codes, scale {float(s):.6g}",
                         parts(enc, enc))
    sk, sv = scale_of(k_hf), scale_of(v_hf)
    if bool(sk == sv):
        enc = _encoder("SFP", sk)
        return SbsTensor(name, "SFP", 2 * k_rows, cols, (k_hf, v_hf), float(sk), "trained sfp8 codes",
                         parts(enc, enc))
    kind = "BF16" if sfp8_values_fit_bf16(sk) and sfp8_values_fit_bf16(sv) else "F32"
    notes.append(f"{name}: k_proj and v_proj were trained with different sfp8 scales ({float(sk):.6g} vs "
                 f"{float(sv):.6g}) and gemma.cpp holds one scale per tensor: written as their exact trained values "
                 f"in {kind}")
    return SbsTensor(name, kind, 2 * k_rows, cols, (k_hf, v_hf), 1.0, f"exact sfp8 values in {kind}",
                     parts(_encoder(f"{kind}-values", sk), _encoder(f"{kind}-values", sv)))


# ------------------------------------------------------------------------------------------------- export


def read_tokenizer_blob(ckpt: Checkpoint) -> bytes:
    """The SentencePiece model the ``.sbs`` file embeds: ``tokenizer.model`` as it is, else a ``ModelProto``
    built from ``tokenizer.json`` (``gemma3_qat.vocab``: same pieces and merges, so gemma.cpp tokenizes like HF)."""
    path = ckpt.require_tokenizer_model()
    if path.name == "tokenizer.model":
        read_sentencepiece_vocab(ckpt.path)  # with a tokenizer.json too: the two must agree
        return path.read_bytes()
    return sentencepiece_model_proto(read_sentencepiece_vocab(ckpt.path))


def model_card_path(path: Path) -> Path:
    return path.with_suffix(".md") if path.suffix != ".md" else path.with_name(path.name + ".md")


def export_gemma_cpp(checkpoint: str | Path, output: str | Path | None = None, *, type: str | None = None,
                     wrapping: str | None = None, dry_run: bool = False, force: bool = False,
                     model_card: bool = True, log: Callable[[str], None] | None = print) -> GemmaCppPlan:
    """Export ``checkpoint`` to a gemma.cpp ``.sbs`` file; returns the plan (with ``dry_run``, writes nothing).

    ``type``: for a plain checkpoint, bf16 (default) | f32 | sfp8; a QAT checkpoint's types come from
    ``qat.json``. ``wrapping``: pt (BOS only) or it (gemma.cpp applies the chat template); default: it when the
    checkpoint's (or its teacher's) name says ``-it``. Default output: ``<checkpoint>/<name>-<format>.sbs``.
    The file and its model card (``<output>.md``) are refused if they exist without ``force`` or if their parent
    does not exist; both are checked before the first byte is written.
    """
    ckpt = Checkpoint(checkpoint, verify=not dry_run)  # a dry run checks sizes and headers, not checksums
    if ckpt.qat is not None and ckpt.qat.format != "sfp8":
        _tensor_types(ckpt, type)  # the int4 refusal comes before anything else is looked at
    tokenizer = read_tokenizer_blob(ckpt)
    if output is None:
        suffix = ckpt.qat.format if ckpt.qat else (type or "bf16")
        output = ckpt.path / f"{ckpt.path.name}-{suffix}.sbs"
    plan = plan_gemma_cpp(ckpt, Path(output), type=type, wrapping=wrapping, tokenizer=tokenizer)
    if dry_run:
        return plan
    for path in [plan.path] + ([model_card_path(plan.path)] if model_card else []):
        check_output(path, force=force, make_parents=False)
    meta = plan.metadata_blobs()
    blobs = [(t.name, t.nbytes) for t in plan.tensors] + [(name, len(data)) for name, data in meta]
    with atomic_file(plan.path, force=force, make_parents=False) as tmp, open(tmp, "wb") as f:
        writer = SbsWriter(f, blobs)
        for n, t in enumerate(plan.tensors):
            for chunk in t.chunks(ckpt):
                writer.write(chunk)
            if log and (n + 1) % 50 == 0:
                log(f"  {n + 1}/{len(plan.tensors)} tensors")
        for _, data in meta:
            writer.write(data)
        writer.close()
    if model_card:
        write_model_card(ckpt, plan)
    return plan


def write_model_card(ckpt: Checkpoint, plan: GemmaCppPlan) -> Path:
    qat, cfg = ckpt.qat, plan.config
    wrapping = {v: k for k, v in WRAPPING.items()}[cfg.wrapping]
    lines = [f"# {plan.path.name}", "", f"gemma.cpp single-file weights, written by gemma3-qat {__version__}.", "",
             f"- base checkpoint: `{ckpt.path}`"]
    if qat:
        lines += [f"- quantization-aware training: format `{qat.format}`, {qat.steps} steps, teacher "
                  f"`{qat.teacher}`, KD `{qat.kd}`", f"- embedding trained quantized: {qat.quantize_embeddings}"]
        lines += [f"- {k}: {v}" for k, v in qat.metrics.items()]
    else:
        lines.append("- post-training conversion (no QAT)")
    lines += [f"- model: {cfg.num_layers} layers, model_dim {cfg.model_dim}, vocab {cfg.vocab_size}, max_seq_len "
              f"{cfg.max_seq_len}, wrapping {wrapping}, eos {cfg.eos_id} / {cfg.secondary_eos_id}",
              f"- file: {plan.file_bytes:,} bytes", "", "| type | tensor bytes |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in plan.bytes_by_type().items()]
    lines += ["", "Run: `gemma --weights " + plan.path.name + " --prompt \"...\" --temperature 0`", ""]
    lines += [f"Note: {n}" for n in plan.notes]
    card = model_card_path(plan.path)
    with atomic_file(card, force=True, make_parents=False) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return card


# ------------------------------------------------------------------------------------------------- prediction


def predict_file_bytes(arch: Architecture, *, type: str = "sfp8", quantize_embeddings: bool = False,
                       tokenizer_bytes: int, vocab: int | None = None, name: str = "gemma3",
                       steps: int | None = None) -> dict:
    """The exact size of the ``.sbs`` the exporter writes for a Gemma 3 architecture, without weights: the memory
    model's gemma.cpp column. ``type``: sfp8 (a QAT run or the PTQ baseline: matmuls SFP, embedding SFP when
    ``quantize_embeddings`` else BF16) | bf16 | f32; norms F32. ``vocab``: the embedding rows (default
    ``arch.vocab``); ``name``/``steps``: the checkpoint's directory name and a QAT run's steps (they are in the
    config's display name: a few bytes). Not predicted: an sfp8 run whose K and V were trained with different scales
    (that layer's ``qkv2_w`` is then BF16/F32, see the module doc). Returns file, tensor and per-type bytes."""
    if type not in PLAIN_TYPES:
        raise GemmaCppError(f"unknown type {type!r}; choose one of: {', '.join(PLAIN_TYPES)}")
    body = {"bf16": "BF16", "f32": "F32", "sfp8": "SFP"}[type]
    emb = "SFP" if type == "sfp8" and quantize_embeddings else ("BF16" if body == "SFP" else body)
    d, h, n, vocab = arch.hidden, arch.heads, arch.layers, vocab or arch.vocab
    layer = LayerConfig(d, arch.ffn, h, arch.kv_heads, arch.head_dim)
    weight = min((body, emb, "F32"), key=lambda t: TYPE_BITS[t])
    fmt = "sfp8" if type == "sfp8" and steps is not None else None
    config = ModelConfig(display_name(name, fmt, steps), MODELS[arch.gemma_cpp_identity()[0]], WRAPPING["pt"],
                         TYPES[weight], d, vocab, arch.context, (layer,) * n, (1,) * n)
    per_layer = {"ff_hidden_dim": layer.ff_hidden_dim, "heads": h, "kv_heads": layer.kv_heads,
                 "qkv_dim": layer.qkv_dim}
    shapes = expected_shapes({"model_dim": d, "vocab_size": vocab, "layer_configs": [per_layer] * n})
    records = [MatRecord(name, emb if name == "c_embedding" else "F32" if rows == 1 else body, rows, cols)
               for name, (rows, cols) in shapes.items()]
    by_type: dict[str, int] = {}
    for r in records:
        by_type[r.type] = by_type.get(r.type, 0) + r.nbytes
    meta = [len(config.to_bytes()), tokenizer_bytes, len(toc_bytes(records))]
    return {"file_bytes": file_bytes_of([r.nbytes for r in records] + meta),
            "tensor_bytes": sum(by_type.values()), "bytes_by_type": by_type}
