"""Knowledge-distillation targets and losses: the student learns the teacher's probabilities.

Three ways to form the target at each position (``--kd``):

* ``full``    the teacher's full-vocabulary distribution ``softmax(t / T)``: cross-entropy against the student's
              ``log_softmax(s / T)`` (forward KL up to the teacher's entropy), scaled by ``T**2``. The reference.
* ``sampled`` the Gemma 3 report's scheme (§2.2): ``k`` ids drawn from the teacher's distribution, weighted by its
              probabilities, and the student fits the distribution of the draws. Draws are *with replacement*
              (stratified inverse-CDF sampling) and each weighs ``1/k``: the target's expectation is exactly the
              teacher distribution, so the gradient is an unbiased estimate of the full one. (Renormalising the
              teacher probabilities over the distinct ids drawn, the other reading of the report, over-weights the
              head and drives the student's tail to zero: in 50 steps on the embedded model it doubled the KL to
              the teacher.) The uniforms are keyed by (sample id, position), so targets do not depend on batching
              or process count.
* ``topk``    the teacher's ``k`` most likely ids with their true probabilities, plus one "rest of the vocabulary"
              class holding the remaining mass: the student matches the head id by id and the tail in aggregate
              (a plain renormalised top-k target would push every other id's probability to zero).

A sparse target is ``(ids [..., k], log_probs [..., k])``: the log of each entry's target weight (``log(1/k)`` per
draw for ``sampled``, repeated ids allowed; the teacher's log-probability for ``topk``). Weights summing to less
than one leave the rest to the tail class. The teacher cache stores exactly this, so live and cached training see
identical targets. (Sparse-target KD and its biases: Anshumann et al., "Sparse Logit Sampling", ACL 2025.)

The functions on logits (``kd_loss_per_token``, ``distillation_loss``, ``token_metrics``) are the definitions;
the trainer runs them through ``kd_loss`` and ``validation_sums``, which take the models and apply them per chunk
of positions with the LM heads inside the chunk (``qat.head``): at Gemma 3's 262,144-piece vocabulary no
``[micro-batch tokens x vocab]`` tensor of student or teacher, nor their softmaxes or gradients, is alive at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gemma3_qat.errors import InputError
from gemma3_qat.qat.head import chunk_rows, forward_with_head, fused_head_loss

KD_MODES = ("full", "sampled", "topk")


@dataclass(frozen=True)
class KDConfig:
    mode: str = "full"
    k: int = 256  # ids per position for sampled / topk
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the ground-truth next-token loss: loss = (1 - alpha) * KD + alpha * CE
    seed: int = 0  # keys the Gumbel noise of `sampled`

    def __post_init__(self):
        if self.mode not in KD_MODES:
            raise InputError(f"unknown --kd {self.mode!r}; choose one of: {', '.join(KD_MODES)}")
        if self.k < 1:
            raise InputError(f"--kd-k must be at least 1, got {self.k}")
        if self.temperature <= 0:
            raise InputError(f"--kd-temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"--kd-alpha must be in [0, 1], got {self.alpha}")


@dataclass
class SparseTarget:
    ids: torch.Tensor  # [B, T, k] int64
    log_probs: torch.Tensor  # [B, T, k] fp32: log target weight of each entry (sum <= 1; the rest is the tail)


NOISE_BLOCK = 64  # positions per independently keyed block of uniforms


def draw_uniforms(sample_id: int, start: int, length: int, k: int, seed: int, device) -> torch.Tensor:
    """Stratified uniforms [length, k] for positions start..start+length of one sample: draw j of a position lies
    in [j/k, (j+1)/k). A deterministic function of (seed, sample id, block of NOISE_BLOCK positions)."""
    blocks = []
    for block_start in range(start - start % NOISE_BLOCK, start + length, NOISE_BLOCK):
        key = ((seed * 1_000_003 + int(sample_id)) * 1_000_033 + block_start) % (2**63 - 1)
        g = torch.Generator(device=device).manual_seed(key)
        blocks.append(torch.rand(NOISE_BLOCK, k, generator=g, device=device))
    offset = start % NOISE_BLOCK
    u = torch.cat(blocks)[offset:offset + length]
    return (u + torch.arange(k, device=device)) / k


def sparse_target(teacher_logits: torch.Tensor, config: KDConfig, sample_ids: torch.Tensor | None = None) -> SparseTarget:
    """Sampled or top-k target from teacher logits [B, T, V] (see the module docstring)."""
    b, t, v = teacher_logits.shape
    sids = positions = None
    if sample_ids is not None:
        sids = sample_ids.to(teacher_logits.device).view(b, 1).expand(b, t).reshape(-1)
        positions = torch.arange(t, device=teacher_logits.device).expand(b, t).reshape(-1)
    rows = sparse_target_rows(teacher_logits.reshape(b * t, v), config, sids, positions)
    return SparseTarget(rows.ids.view(b, t, -1), rows.log_probs.view(b, t, -1))


def _tempered(logits: torch.Tensor, t: float) -> torch.Tensor:
    """fp32 logits / t; at t = 1 the logits themselves (the same values: no logit-sized copy, nor its gradient's)."""
    logits = logits.float()
    return logits if t == 1 else logits / t


def sparse_target_rows(teacher_logits: torch.Tensor, config: KDConfig, sample_ids: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None) -> SparseTarget:
    """``sparse_target`` of rows [N, V], each row the position ``positions[i]`` of sample ``sample_ids[i]`` (what
    keys a sampled row's draws): any subset of a batch's positions, in any chunking, gets the same ids."""
    logp = F.log_softmax(_tempered(teacher_logits, config.temperature), dim=-1)
    k = min(config.k, logp.size(-1))
    if config.mode == "topk":
        picked, ids = logp.topk(k, dim=-1)
        return SparseTarget(ids, picked)
    if config.mode != "sampled":
        raise InputError(f"{config.mode} KD has no sparse target")
    if sample_ids is None or positions is None:
        raise InputError("sampled KD needs the sample ids that key its draws")
    n = logp.size(0)
    ids = torch.empty(n, k, dtype=torch.long, device=logp.device)
    if n == 0:
        return SparseTarget(ids, torch.empty(0, k, device=logp.device))
    # runs of consecutive positions of one sample within one NOISE_BLOCK: one block of uniforms each, and the
    # CDF's memory stays [NOISE_BLOCK, V]
    new_run = torch.ones(n, dtype=torch.bool, device=logp.device)
    new_run[1:] = ((sample_ids[1:] != sample_ids[:-1]) | (positions[1:] != positions[:-1] + 1)
                   | (positions[1:] % NOISE_BLOCK == 0))
    starts = new_run.nonzero().flatten().tolist() + [n]
    sids, pos = sample_ids.tolist(), positions.tolist()
    last = logp.size(-1) - 1
    for a, b in zip(starts[:-1], starts[1:]):
        cdf = logp[a:b].exp().cumsum(-1)
        u = draw_uniforms(sids[a], pos[a], b - a, k, config.seed, logp.device) * cdf[:, -1:]
        ids[a:b] = torch.searchsorted(cdf, u, right=True).clamp_(max=last)  # inverse CDF
    return SparseTarget(ids, torch.full(ids.shape, -math.log(k), device=logp.device))


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate on both sides of -log 2."""
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


TAIL_EPS = 1e-6  # tail mass below which the tail class is left out (k = vocabulary: only rounding remains)


def kd_loss_per_token(student_logits: torch.Tensor, config: KDConfig, *, teacher_logits: torch.Tensor | None = None,
                      target: SparseTarget | None = None) -> torch.Tensor:
    """Cross-entropy of the student against the teacher target, per position [B, T] (fp32)."""
    t = config.temperature
    student_logp = F.log_softmax(_tempered(student_logits, t), dim=-1)
    if config.mode == "full":
        teacher_p = F.softmax(_tempered(teacher_logits, t), dim=-1)
        return -(teacher_p * student_logp).sum(-1) * t * t
    weights = target.log_probs.exp()
    picked = student_logp.gather(-1, target.ids)
    loss = -(weights * picked).sum(-1)
    if config.mode == "topk":  # the tail class; topk ids are distinct, so the student's head mass is a sum
        tail = 1 - weights.sum(-1)
        head = picked.logsumexp(-1).clamp(max=-1e-7)
        loss = loss - torch.where(tail > TAIL_EPS, tail, 0.0) * _log1mexp(head)
    return loss * t * t


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position t predicts token t+1: logits [B, T-1, V], labels [B, T-1] (-100 = ignored)."""
    return logits[:, :-1], labels[:, 1:]


def distillation_loss(student_logits, labels, config: KDConfig, *, teacher_logits=None, target=None,
                      normalizer: float | None = None) -> tuple[torch.Tensor, dict]:
    """(1 - alpha) * KD + alpha * CE over the positions whose label is not -100.

    ``student_logits``/``teacher_logits``/``target`` are already aligned with ``labels`` (see
    ``shift_for_next_token``). ``normalizer``: the number of valid positions to average over (defaults to this
    batch's; pass the global count so that micro-batches and processes weigh tokens equally).
    """
    mask = labels != -100
    n = normalizer if normalizer is not None else mask.sum().clamp(min=1)
    kd = (kd_loss_per_token(student_logits, config, teacher_logits=teacher_logits, target=target) * mask).sum() / n
    parts = {"kd_loss": kd.detach()}
    loss = kd
    if config.alpha > 0:
        ce = F.cross_entropy(student_logits.float().reshape(-1, student_logits.size(-1)), labels.reshape(-1),
                             ignore_index=-100, reduction="sum") / n
        parts["ce_loss"] = ce.detach()
        loss = (1 - config.alpha) * kd + config.alpha * ce
    return loss, parts


@torch.no_grad()
def token_metrics(student_logits: torch.Tensor, labels: torch.Tensor, *, teacher_logits: torch.Tensor | None = None,
                  teacher_top1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """THE definitions of the agreement metrics, per position (inputs aligned as by ``shift_for_next_token``):

    * ``nll``  the student's negative log-likelihood of the label (natural log; perplexity = exp of its mean);
    * ``kl``   KL(teacher || student) over the full vocabulary (needs ``teacher_logits``);
    * ``top1`` 1 where the student's most likely id is the teacher's (``teacher_logits``, or the teacher's top-1
               ids ``teacher_top1`` as a teacher cache stores them);
    * ``teacher_nll`` the teacher's NLL of the label (with ``teacher_logits``: its log-softmax is computed anyway);
    * ``mask`` the positions whose label is not -100 (the others hold meaningless values: sum under the mask).

    The trainer's validation, ``evaluate`` and the embedded model's pretraining all use it, so a number means the
    same thing wherever it is printed.
    """
    mask = labels != -100
    index = labels.clamp(min=0).unsqueeze(-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    out = {"mask": mask, "nll": -s.gather(-1, index).squeeze(-1)}
    if teacher_logits is not None:
        t = F.log_softmax(teacher_logits.float(), dim=-1)
        out["kl"] = (t.exp() * (t - s)).sum(-1)
        out["teacher_nll"] = -t.gather(-1, index).squeeze(-1)
        teacher_top1 = t.argmax(-1)
    if teacher_top1 is not None:
        out["top1"] = (s.argmax(-1) == teacher_top1).float()
    return out


# ------------------------------------------------------------------------------------------------- chunked
# The trainer's loss and validation: the functions above, applied chunk by chunk of positions with the LM heads
# inside the chunk (``head``), so that no [micro-batch tokens x vocab] tensor of student or teacher, nor their
# softmaxes or gradients, is alive for the whole micro-batch. Masked positions are dropped before the head.


@dataclass
class _Rows:
    """One micro-batch's per-position inputs, flattened to the valid (label != -100) positions."""

    valid: torch.Tensor  # [B * (T-1)] bool
    labels: torch.Tensor  # [N]
    sample_ids: torch.Tensor | None  # [N]: what keys sampled draws
    positions: torch.Tensor | None  # [N]
    teacher_hidden: torch.Tensor | None = None  # [N, H] the live teacher's final hidden states
    teacher_head: object = None  # its head.OutputHead
    target: SparseTarget | None = None  # [N, k] cached targets
    teacher_top1: torch.Tensor | None = None  # [N] cached top-1 ids

    @classmethod
    def of(cls, labels, sample_ids, teacher, input_ids, target=None, teacher_top1=None) -> "_Rows":
        shifted = labels[:, 1:]
        b, t = shifted.shape
        valid = (shifted != -100).reshape(-1)
        sids = positions = None
        if sample_ids is not None:
            sids = sample_ids.to(labels.device).view(b, 1).expand(b, t).reshape(-1)[valid]
            positions = torch.arange(t, device=labels.device).expand(b, t).reshape(-1)[valid]
        rows = cls(valid, shifted.reshape(-1)[valid], sids, positions)
        if teacher is not None:
            hidden, rows.teacher_head = teacher_hidden(teacher, input_ids)
            rows.teacher_hidden = rows.take(hidden)
        if target is not None:
            rows.target = SparseTarget(rows.take(target.ids, shifted=False),
                                       rows.take(target.log_probs, shifted=False))
        if teacher_top1 is not None:
            rows.teacher_top1 = rows.take(teacher_top1, shifted=False)
        return rows

    def take(self, x: torch.Tensor, shifted: bool = True) -> torch.Tensor:
        """[B, T, ...] (or already aligned [B, T-1, ...]) -> [N, ...] at the valid positions."""
        x = x[:, :-1] if shifted else x
        return x.reshape(-1, *x.shape[2:])[self.valid]

    @torch.no_grad()
    def teacher(self, s: int, e: int, config: KDConfig) -> tuple[torch.Tensor | None, SparseTarget | None]:
        """(teacher logits, sparse target) of rows s:e: the live teacher's head per chunk, or the cache's rows."""
        if self.teacher_hidden is None:
            return None, SparseTarget(self.target.ids[s:e], self.target.log_probs[s:e])
        logits = self.teacher_head.logits(self.teacher_hidden[s:e])
        if config.mode == "full":
            return logits, None
        sids = self.sample_ids[s:e] if self.sample_ids is not None else None
        pos = self.positions[s:e] if self.positions is not None else None
        return logits, sparse_target_rows(logits, config, sids, pos)


@torch.no_grad()
def teacher_hidden(teacher, input_ids: torch.Tensor):
    """(final hidden states [B, T, H], head) of the teacher: its forward without the full logits."""
    return forward_with_head(teacher, lambda hidden, head: (None, (hidden, head)), input_ids=input_ids)[1]


@torch.no_grad()
def teacher_targets(teacher, input_ids: torch.Tensor, config: KDConfig, sample_ids: torch.Tensor | None = None,
                    rows: int | None = None) -> tuple[SparseTarget, torch.Tensor]:
    """(sparse target [B, T-1, k], top-1 ids [B, T-1]) of every next-token position, the teacher's head run per
    chunk of positions (what a teacher cache stores: ``sparse_target`` of the full logits, without them)."""
    hidden, head = teacher_hidden(teacher, input_ids)
    b, t = input_ids.shape[0], input_ids.shape[1] - 1
    h = hidden[:, :-1].reshape(b * t, -1)
    sids = sample_ids.to(h.device).view(b, 1).expand(b, t).reshape(-1) if sample_ids is not None else None
    positions = torch.arange(t, device=h.device).expand(b, t).reshape(-1)
    step = rows or chunk_rows(head.vocab)
    ids, log_probs, top1 = [], [], []
    for s in range(0, b * t, step):
        e = min(s + step, b * t)
        logits = head.logits(h[s:e])
        part = sparse_target_rows(logits, config, sids[s:e] if sids is not None else None, positions[s:e])
        ids.append(part.ids)
        log_probs.append(part.log_probs)
        top1.append(logits.argmax(-1))
    k = ids[0].shape[-1] if ids else min(config.k, head.vocab)
    return (SparseTarget(torch.cat(ids).view(b, t, k), torch.cat(log_probs).view(b, t, k)),
            torch.cat(top1).view(b, t))


def kd_loss(student, input_ids: torch.Tensor, labels: torch.Tensor, config: KDConfig, *, teacher=None,
            target: SparseTarget | None = None, sample_ids: torch.Tensor | None = None,
            normalizer: float | None = None, rows: int | None = None) -> tuple[torch.Tensor, dict]:
    """``distillation_loss`` of one micro-batch, run end to end and chunked: (loss, {"kd_loss", "ce_loss"}).

    ``labels`` [B, T] as packed (shifted here); the target comes from the live ``teacher`` (its hidden states,
    then its head per chunk; ``sample_ids`` key the sampled draws) or is ``target`` [B, T-1, k] (a teacher cache).
    ``normalizer`` as in ``distillation_loss``; ``rows``: positions per chunk (default ``head.chunk_rows``).
    Same loss and gradients as ``distillation_loss`` on full logits, to float rounding (``tests/test_distill.py``).
    """
    side = _Rows.of(labels, sample_ids, teacher, input_ids, target=target)
    n = normalizer if normalizer is not None else side.valid.sum().clamp(min=1)
    parts = {"kd_loss": 0.0, "ce_loss": 0.0}  # detached sums, on the device (no sync per chunk)

    def chunk_loss(logits, s, e):
        teacher_logits, sparse = side.teacher(s, e, config)
        if sparse is not None:
            teacher_logits = None  # the target is drawn: the chunk's teacher logits can go now
        kd = kd_loss_per_token(logits, config, teacher_logits=teacher_logits, target=sparse).sum() / n
        parts["kd_loss"] = parts["kd_loss"] + kd.detach()
        if config.alpha == 0:
            return kd
        ce = F.cross_entropy(logits.float(), side.labels[s:e], reduction="sum") / n
        parts["ce_loss"] = parts["ce_loss"] + ce.detach()
        return (1 - config.alpha) * kd + config.alpha * ce

    def consume(hidden, head):
        return fused_head_loss(side.take(hidden), head, chunk_loss, rows), None

    loss, _ = forward_with_head(student, consume, input_ids=input_ids)
    if config.alpha == 0:
        del parts["ce_loss"]
    return loss.reshape(()), parts


@torch.no_grad()
def validation_sums(student, input_ids: torch.Tensor, labels: torch.Tensor, config: KDConfig, *, teacher=None,
                    target: SparseTarget | None = None, teacher_top1: torch.Tensor | None = None,
                    sample_ids: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """[KL, KD loss, top-1 agreement, NLL, count] summed over one micro-batch's valid positions (``token_metrics``
    and ``kd_loss_per_token``, chunked as ``kd_loss``). With a cache (``target``, ``teacher_top1`` [B, T-1]) the KL
    sum is 0: a cache holds no full distribution."""
    side = _Rows.of(labels, sample_ids, teacher, input_ids, target=target, teacher_top1=teacher_top1)

    def consume(hidden, head):
        h = side.take(hidden)
        sums = torch.zeros(5, device=h.device)
        step = rows or chunk_rows(head.vocab)
        for s in range(0, h.shape[0], step):
            sums += _validation_chunk(side, head, h, s, min(s + step, h.shape[0]), config)
        return None, sums

    return forward_with_head(student, consume, input_ids=input_ids)[1]


@torch.no_grad()
def _validation_chunk(side: _Rows, head, h: torch.Tensor, s: int, e: int, config: KDConfig) -> torch.Tensor:
    """``validation_sums`` of rows s:e: [KL, KD loss, top-1, NLL, count]."""
    logits = head.logits(h[s:e])
    teacher_logits, sparse = side.teacher(s, e, config)
    top1 = side.teacher_top1[s:e] if side.teacher_top1 is not None else None
    m = token_metrics(logits, side.labels[s:e], teacher_logits=teacher_logits, teacher_top1=top1)
    kd = kd_loss_per_token(logits, config, teacher_logits=teacher_logits if config.mode == "full" else None,
                           target=sparse)
    kl = m["kl"].sum() if "kl" in m else torch.zeros((), device=h.device)
    return torch.stack([kl, kd.sum(), m["top1"].sum(), m["nll"].sum(), torch.tensor(float(e - s), device=h.device)])


def load_teacher(source: str, device: torch.device | None = None, precision=None):
    """The teacher: the unquantized checkpoint, frozen, in eval mode, held in the dtype the run computes in
    (``precision``, a ``config.Precision``: bf16 under bf16 autocast, on CUDA and on CPUs with native bf16
    matmuls: half the memory and no casts; else fp32). None: ``--mixed-precision auto`` for this device and
    model. ``device`` None: spread over the visible GPUs (``device_map="auto"``, for a teacher cache of a model
    larger than one GPU) or the CPU."""
    from gemma3_qat.qat.precision import choose_precision
    from gemma3_qat.sources import load_gemma3, source_architecture

    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if precision is None:
        precision = choose_precision("auto", cuda=cuda, hidden=source_architecture(source).hidden)
    dtype = precision.teacher_dtype
    if device is None:
        teacher = load_gemma3(source, dtype=dtype, **({"device_map": "auto"} if cuda else {}))
    else:
        teacher = load_gemma3(source, dtype=dtype).to(device)
    return teacher.eval().requires_grad_(False)
