"""Training memory of QAT by distillation, per GPU: components and the estimated peak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gemma3_qat.memory.base import MemoryInputError, _positive
from gemma3_qat.memory.kv import context_warnings
from gemma3_qat.memory.spec import ModelSpec, model_spec, param_counts


@dataclass(frozen=True)
class TrainingOptions:
    """One QAT-by-distillation setup, as ``gemma3_qat.qat.train`` runs it. Validated on creation.

    ``device``: ``cuda`` (foreach AdamW) or ``cpu`` (fused AdamW; the trainer's allocator set-up, ``qat.cpu_memory``).
    ``mixed_precision``: ``auto`` (the trainer's rule: bf16 on CUDA and on CPUs with native bf16 matmuls for models
    wide enough, else fp32; it depends on the host, ``training_memory`` resolves it for the model), ``bf16`` or
    ``no``. Under bf16 the live teacher is held in bf16 and the fake-quant cache holds bf16 values.
    ``teacher``: ``live`` (a frozen teacher in memory; train.py keeps it out of FSDP, so every GPU holds all of
    it) or ``cache`` (``--teacher-cache``: sparse targets read from disk, no teacher).
    ``attention``: ``sdpa`` (fused kernels: no score matrix kept) or ``eager`` (``[heads, T, T]`` fp32 softmax
    kept per layer for backward).
    """

    seq_len: int = 2048
    micro_batch: int = 1
    gpus: int = 1
    device: str = "cuda"
    teacher: str = "live"
    kd: str = "full"  # full | sampled | topk
    kd_k: int = 256
    gradient_checkpointing: bool = False
    quantize_embeddings: bool = False
    attention: str = "sdpa"
    fake_quant_cache: bool | None = None  # None = the trainer's auto (``fake_quant_cache_on``; FSDP = gpus > 1)
    mixed_precision: str = "auto"

    def __post_init__(self):
        for name in ("seq_len", "micro_batch", "gpus", "kd_k"):
            _positive(name.replace("_", "-"), getattr(self, name))
        for name, value, valid in (("device", self.device, ("cuda", "cpu")), ("teacher", self.teacher,
                                   ("live", "cache")), ("kd", self.kd, ("full", "sampled", "topk")),
                                   ("attention", self.attention, ("sdpa", "eager")),
                                   ("mixed_precision", self.mixed_precision, ("auto", "bf16", "no"))):
            if value not in valid:
                raise MemoryInputError(f"unknown {name} {value!r}; choose one of: {', '.join(valid)}")
        if self.teacher == "cache" and self.kd == "full":
            object.__setattr__(self, "kd", "topk")  # a cache stores sparse targets only (teacher-cache's default)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    def resolved(self, hidden: int | None = None) -> "TrainingOptions":
        """These options with ``mixed_precision`` resolved as the trainer resolves it for a model of width
        ``hidden`` on this host (the trainer's rule, asked rather than restated; imported here so that the other
        memory views do not load the trainer at all)."""
        from gemma3_qat.qat.precision import choose_precision

        mode = choose_precision(self.mixed_precision, cuda=self.device == "cuda", hidden=hidden).mode
        return replace(self, mixed_precision=mode)

    @property
    def autocast(self) -> bool:
        """bf16 autocast (``mixed_precision`` resolved; ``auto`` for a model wide enough) or fp32 compute."""
        return self.resolved().mixed_precision == "bf16" if self.mixed_precision == "auto" else \
            self.mixed_precision == "bf16"

    @property
    def compute_bytes(self) -> int:
        return 2 if self.autocast else 4

    @property
    def teacher_bytes(self) -> int:
        """Bytes per parameter of the live teacher: it is held in the compute dtype (``distill.load_teacher``)."""
        return self.compute_bytes

    @property
    def cache_on(self) -> bool:
        from gemma3_qat.qat.config import fake_quant_cache_on

        if self.fake_quant_cache is None:
            return fake_quant_cache_on("auto", is_fsdp=self.gpus > 1)
        return self.fake_quant_cache


# Elements kept for backward per token and layer (HF Gemma 3 decoder layer, eager autograd; an estimate):
#   4 RMSNorms (input, post-attention, pre-FFN, post-FFN) keep input and output: 8 x hidden, fp32 always;
#   q/k norms keep input and output: 2 q + 2 kv; sdpa keeps q, k and v expanded to all heads (repeat_kv) and the
#   output: 4 q; o_proj keeps its input: 1 q; the GeGLU keeps gate, gelu(gate), up and the product: 4 ffn.
# The matmul inputs (the normed hidden state) are the norms' outputs, already counted.
NORM_ELEMENTS_PER_HIDDEN = 8
ACT_ELEMENTS = {"ffn": 4, "q": 7, "kv": 2}
# The loss runs in chunks of positions with the LM heads inside the chunk (``qat.head``, ``distill.kd_loss``):
# logit-sized buffers are [chunk, vocab] fp32, chunk = min(tokens, ``head.chunk_rows(vocab)``). Alive at a chunk's
# peak (its loss's backward, inside the forward pass): the student's logits, log-softmax, the gradient of the
# loss's last op and of the log-softmax with its exp temporary; full KD adds the teacher's logits, softmax and
# their product; sparse targets are drawn before the student's loss and leave nothing logit-sized behind.
CHUNK_COPIES = {"full": 7, "sampled": 5, "topk": 5}
# Validation (no gradients): token_metrics keeps the student's and teacher's logits, both log-softmaxes, the
# teacher's probabilities, their difference and product; from a cache, only the student's side.
VALIDATION_CHUNK_COPIES = {"live": 7, "cache": 3}
EAGER_SCORE_COPIES = 2  # eager attention keeps the fp32 softmax and its (dropout) output for the value matmul
# AdamW as the trainer builds it: on CUDA torch's foreach path, whose temporaries are one fp32 copy of the (sharded)
# parameters; on the CPU the fused kernel (one pass over each parameter, no temporaries).


@dataclass
class TrainingMemory:
    """Per-GPU bytes by component and the peak, for one setup. ``phases``: the three candidate peaks."""

    model: str
    options: TrainingOptions
    components: dict[str, int]
    phases: dict[str, int]
    notes: list[str]

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def upper_bound(self) -> int:
        return sum(self.components.values())


def _activation_elements_per_token_layer(spec: ModelSpec) -> tuple[int, int]:
    """(fp32 elements, compute-dtype elements) kept per token in one decoder layer."""
    other = ACT_ELEMENTS["ffn"] * spec.ffn + ACT_ELEMENTS["q"] * spec.q_dim + ACT_ELEMENTS["kv"] * spec.kv_dim
    return NORM_ELEMENTS_PER_HIDDEN * spec.hidden, other


def activation_bytes(spec: ModelSpec, opts: TrainingOptions) -> int:
    """Activations kept for backward (per GPU: each GPU runs its own micro-batch, FSDP shards no activations).

    Without checkpointing every layer keeps its set; with it each layer keeps only its input (the fp32 residual
    stream, ``hidden`` per token) and one layer's set is live during its recompute. Eager attention adds the
    score matrices ``[heads, T, T]`` per sequence and layer (sliding layers too: HF masks a full T x T matrix).
    """
    fp32, other = _activation_elements_per_token_layer(spec)
    per_layer = opts.tokens * (4 * fp32 + opts.compute_bytes * other)
    scores = 0
    if opts.attention == "eager":
        scores = EAGER_SCORE_COPIES * 4 * spec.heads * opts.seq_len * opts.seq_len * opts.micro_batch
    if opts.gradient_checkpointing:
        return 4 * opts.tokens * spec.hidden * spec.layers + per_layer + scores
    return (per_layer + scores) * spec.layers


def chunk_tokens(spec: ModelSpec, opts: TrainingOptions) -> int:
    """Positions per loss chunk (the trainer's rule, asked rather than restated)."""
    from gemma3_qat.qat.head import chunk_rows  # lazy: the other memory views need no torch

    return min(opts.tokens, chunk_rows(spec.vocab))


def logit_bytes(spec: ModelSpec, opts: TrainingOptions) -> int:
    """The loss's buffers at its peak: one chunk's [chunk, vocab] fp32 buffers, plus the micro-batch's
    [tokens, hidden] rows (student hidden states gathered at the labelled positions, their gradient, the live
    teacher's hidden states) or the cached targets (int64 ids and fp32 log-probabilities, read and gathered)."""
    chunk = chunk_tokens(spec, opts) * spec.vocab * 4
    rows = 2 * opts.tokens * spec.hidden * 4
    if opts.teacher == "cache":
        return CHUNK_COPIES[opts.kd] * chunk + rows + 2 * opts.tokens * opts.kd_k * 12
    return CHUNK_COPIES[opts.kd] * chunk + rows + opts.tokens * spec.hidden * opts.teacher_bytes


def validation_bytes(spec: ModelSpec, opts: TrainingOptions) -> int:
    """Validation's transient buffers: one chunk's logit-sized buffers, the hidden-state rows, and one layer's
    working set of the no-grad forward."""
    chunk = chunk_tokens(spec, opts) * spec.vocab * 4
    fp32, other = _activation_elements_per_token_layer(spec)
    layer = opts.tokens * (4 * fp32 + opts.compute_bytes * other)
    return VALIDATION_CHUNK_COPIES[opts.teacher] * chunk + 2 * opts.tokens * spec.hidden * 4 + layer


def training_memory(model: str | ModelSpec, opts: TrainingOptions | None = None, **kwargs) -> TrainingMemory:
    """Per-GPU training memory of QAT by distillation, by component, and the estimated peak.

    Persistent: student fp32 latent weights (all of them, the frozen vision tower too), AdamW's two fp32 states
    and, in the backward pass, fp32 gradients of the trainable (text) parameters; under FSDP (``gpus`` > 1) these
    three are sharded over the GPUs, plus the gathered units (the root: embedding and final norm, and two decoder
    layers: current and prefetched) in the compute dtype. The teacher (live mode) is never sharded. The
    fake-quant cache keeps an fp32 copy of the quantized weights between steps (on unless FSDP). Weight copies
    kept for backward: autocast's bf16 copy of every matmul weight (CUDA), or the fake-quantized values when no
    cache holds them; with checkpointing only one layer's.

    Peak: activations are freed during backward as gradients appear, and the optimizer step runs after both, so
    the peak is the largest of four phases: (1) persistent + activations + one loss chunk + the head's gradient
    (the fused head accumulates it in the forward pass); (2) persistent + all gradients + the embedding lookup's
    dense gradient; (3) persistent + gradients + AdamW's temporaries (CUDA's foreach path: one fp32 copy of the
    shard; the CPU's single-tensor path: two copies of the largest parameter); (4) validation (the periodic and
    final one: gradients freed, one chunk of the no-grad metrics). On the CPU, phases 2-4 also carry the freed
    activations' pages, which the C allocator keeps resident (the peak is the resident set's high-water mark).
    """
    spec = model_spec(model)
    opts = (opts or TrainingOptions(**kwargs)).resolved(spec.hidden)
    c = param_counts(spec)
    n = opts.gpus
    trainable = c.text
    quantized = c.matmul + (c.embedding if opts.quantize_embeddings else 0)
    per_layer_params = (c.matmul + c.norms - spec.hidden) // spec.layers
    comp: dict[str, int] = {}
    comp["teacher weights"] = c.total * opts.teacher_bytes if opts.teacher == "live" else 0
    comp["student weights (fp32)"] = c.total * 4 // n
    gathered = (c.embedding + spec.hidden + 2 * per_layer_params) * opts.compute_bytes
    comp["fsdp gathered units"] = gathered if n > 1 else 0
    # the cache holds the values in the dtype the matmuls ask for (bf16 under autocast); an embedding's lookup
    # quantizes the rows it reads, so only the head's copy of the table is cached
    comp["fake-quant cache"] = quantized * opts.compute_bytes if opts.cache_on else 0
    layer_share = 1 / spec.layers if opts.gradient_checkpointing else 1.0
    uncached = 0 if opts.cache_on else quantized * opts.compute_bytes * layer_share  # values kept for backward
    # an embedding not trained quantized: the head's bf16 cast of it (once per micro-step) under autocast
    head_cast = c.embedding * 2 if opts.autocast and not opts.quantize_embeddings else 0
    # without a cache, autocast also casts each fp32 matmul weight for its forward and keeps the copy for backward
    autocast_copies = c.matmul * layer_share * 2 if opts.autocast and not opts.cache_on else 0
    comp["weight copies kept for backward"] = int(uncached + head_cast + autocast_copies)
    comp["gradients (fp32)"] = trainable * 4 // n
    comp["adamw states (2 x fp32)"] = trainable * 8 // n
    comp["activations"] = activation_bytes(spec, opts)
    comp["logits and loss (chunked)"] = logit_bytes(spec, opts)
    comp["validation (chunked)"] = validation_bytes(spec, opts)
    # CUDA: torch's default foreach AdamW, one fp32 copy of the shard; CPU: the fused AdamW, no temporaries
    comp["optimizer step temporaries"] = trainable * 4 // n if opts.device == "cuda" else 0
    # CPU: glibc keeps the pages of freed blocks below its mmap threshold resident, and the activations are such
    # blocks (tensors of a few MB per layer): after the backward pass they stay in the RSS until the next forward
    # reuses them, so the later phases carry them (at the 270M shape, rss after zero_grad is persistent + ~1 GB)
    retained = comp["activations"] if opts.device == "cpu" else 0
    if retained:
        comp["freed activations kept resident (cpu)"] = retained
    # CPU: the trainer keeps freed memory in glibc's heap (qat.cpu_memory), so the heap keeps the extent the step's
    # first forward gave it while the fake quantization ran: its fp32 working copy of the quantized weights, and
    # under bf16 the fp32 values before their cast (fitted to benchmarks/train_step.py --shape 270m: within 7% of
    # the four measured peaks, fp32 and bf16, live teacher and cache)
    heap = quantized * 4 * (2 if opts.autocast else 1) if opts.device == "cpu" and opts.cache_on else 0
    if heap:
        comp["fake-quant transients kept in the heap (cpu)"] = heap
    retained_all = retained + heap
    persistent = sum(comp[k] for k in ("teacher weights", "student weights (fp32)", "fsdp gathered units",
                                       "fake-quant cache", "adamw states (2 x fp32)"))
    head_grad = c.embedding * 4 // (n if n > 1 else 1)  # fp32, accumulated by the fused head (qat.head)
    phases = {
        "forward/backward": persistent + comp["weight copies kept for backward"] + comp["activations"]
        + comp["logits and loss (chunked)"] + c.embedding * 4 + heap,
        # the embedding lookup's dense gradient, before it is added to the head's
        "end of backward": persistent + comp["gradients (fp32)"] + head_grad + retained_all,
        "optimizer step": persistent + comp["gradients (fp32)"] + comp["optimizer step temporaries"] + retained_all,
        "validation": persistent + comp["validation (chunked)"] + retained_all,
    }
    notes = [f"tokens per GPU and micro-step: {opts.tokens:,} ({opts.micro_batch} x {opts.seq_len:,})"]
    if opts.seq_len > spec.context:
        notes += context_warnings(spec, opts.seq_len)
    if n > 1:
        notes.append(f"FSDP over {n} GPUs: student weights, gradients and AdamW states sharded; activations, "
                     "logits and the live teacher are not")
    return TrainingMemory(spec.name, opts, comp, phases, notes)
