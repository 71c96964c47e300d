"""KD targets and losses, and the data pipeline's packing and masking."""

import json

import pytest
import torch
import torch.nn.functional as F

from gemma3_qat.qat.data import DataError, DataSource, MixtureSampler, PackedData, load_documents, pack
from gemma3_qat.qat.distill import KDConfig, distillation_loss, kd_loss_per_token, sparse_target


def logits(seed, shape=(2, 70, 50)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_full_kd_is_forward_kl_plus_teacher_entropy():
    s, t = logits(0), logits(1)
    ce = kd_loss_per_token(s, KDConfig("full"), teacher_logits=t)
    tp = F.log_softmax(t, -1)
    kl = (tp.exp() * (tp - F.log_softmax(s, -1))).sum(-1)
    entropy = -(tp.exp() * tp).sum(-1)
    torch.testing.assert_close(ce, kl + entropy)
    # temperature: T**2 * CE(softmax(t/T), log_softmax(s/T))
    ce_t = kd_loss_per_token(s, KDConfig("full", temperature=2.0), teacher_logits=t)
    want = -(F.softmax(t / 2, -1) * F.log_softmax(s / 2, -1)).sum(-1) * 4
    torch.testing.assert_close(ce_t, want)


def test_topk_target_keeps_teacher_probabilities_and_a_tail_class():
    t, s = logits(1), logits(0)
    target = sparse_target(t, KDConfig("topk", k=5))
    assert torch.equal(target.ids, t.topk(5, -1).indices)
    p = F.softmax(t, -1)
    torch.testing.assert_close(target.log_probs.exp(), p.gather(-1, target.ids))
    # the loss is the cross-entropy of the (k + 1)-class coarse distribution: k head ids and the rest
    q = F.softmax(s, -1)
    head_p, head_q = p.gather(-1, target.ids), q.gather(-1, target.ids)
    want = -(head_p * head_q.log()).sum(-1) - (1 - head_p.sum(-1)) * (1 - head_q.sum(-1)).log()
    torch.testing.assert_close(kd_loss_per_token(s, KDConfig("topk", k=5), target=target), want)
    # with k = vocabulary the sparse loss is the full one
    full = kd_loss_per_token(s, KDConfig("full"), teacher_logits=t)
    sparse = kd_loss_per_token(s, KDConfig("topk", k=50), target=sparse_target(t, KDConfig("topk", k=50)))
    torch.testing.assert_close(full, sparse)


def test_topk_loss_does_not_push_the_tail_to_zero():
    """The student that equals the teacher is a stationary point of the top-k loss (renormalised top-k is not)."""
    t = logits(1)
    s = t.clone().requires_grad_(True)
    kd = KDConfig("topk", k=5)
    kd_loss_per_token(s, kd, target=sparse_target(t, kd)).sum().backward()
    assert s.grad.abs().max() < 1e-5


def test_sampled_target_depends_on_sample_and_position_only():
    t = logits(2)
    kd = KDConfig("sampled", k=8, seed=3)
    both = sparse_target(t, kd, sample_ids=torch.tensor([10, 11]))
    alone = sparse_target(t[1:], kd, sample_ids=torch.tensor([11]))
    assert torch.equal(both.ids[1], alone.ids[0])  # batching does not change a sample's draw
    other = sparse_target(t[1:], kd, sample_ids=torch.tensor([12]))
    assert not torch.equal(other.ids, alone.ids)  # another sample id, other draws
    torch.testing.assert_close(both.log_probs.exp().sum(-1), torch.ones(2, 70))  # each draw weighs 1/k


def test_sampled_target_is_unbiased():
    """Averaged over draws, the sampled target is the teacher distribution, so is the gradient of its loss."""
    t = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])).expand(1, 4000, 5)
    for k in (1, 3):
        target = sparse_target(t, KDConfig("sampled", k=k), sample_ids=torch.tensor([0]))
        freq = torch.zeros(5).index_add_(0, target.ids.flatten(), target.log_probs.exp().flatten()) / 4000
        torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01]), atol=0.015, rtol=0)
    # on a wide distribution the draws keep the tail's mass (renormalising over the distinct ids drawn keeps 0.15
    # of the 0.40 outside the teacher's top 10 here)
    t = logits(2, (1, 4000, 200)) * 2 / 3
    target = sparse_target(t, KDConfig("sampled", k=16), sample_ids=torch.tensor([0]))
    p = F.softmax(t, -1)
    dense = torch.zeros_like(p).scatter_add_(-1, target.ids, target.log_probs.exp())
    head = p.topk(10, -1).indices
    teacher_tail = (1 - p.gather(-1, head).sum(-1)).mean()
    target_tail = (dense.sum(-1) - dense.gather(-1, head).sum(-1)).mean()
    assert abs(target_tail - teacher_tail) < 0.01, (target_tail, teacher_tail)


def test_loss_ignores_masked_positions_and_mixes_ce():
    s, t = logits(0), logits(1)
    labels = torch.randint(0, 50, (2, 70))
    labels[:, :10] = -100
    loss, parts = distillation_loss(s, labels, KDConfig("full"), teacher_logits=t)
    per = kd_loss_per_token(s, KDConfig("full"), teacher_logits=t)
    torch.testing.assert_close(loss, per[:, 10:].mean())
    mixed, parts = distillation_loss(s, labels, KDConfig("full", alpha=0.25), teacher_logits=t)
    ce = F.cross_entropy(s.reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(mixed, 0.75 * per[:, 10:].mean() + 0.25 * ce)
    assert set(parts) == {"kd_loss", "ce_loss"}


def test_kd_config_errors_name_the_valid_values():
    with pytest.raises(ValueError, match="full, sampled, topk"):
        KDConfig("reverse")
    with pytest.raises(ValueError, match="kd-alpha"):
        KDConfig(alpha=2)


def test_packing_masks_document_starts_and_padding():
    docs = [{"input_ids": [2, 10, 11, 1], "loss_mask": [1, 1, 1, 1]},
            {"input_ids": [2, 20, 21, 22, 1], "loss_mask": [1, 0, 0, 1, 1]}]
    ids, labels = pack(docs, 4, pad_id=0)
    assert ids.tolist() == [[2, 10, 11, 1], [2, 20, 21, 22], [1, 0, 0, 0]]
    assert labels.tolist() == [[-100, 10, 11, 1], [-100, -100, -100, 22], [1, -100, -100, -100]]


def test_mixture_sampler_is_deterministic_and_weighted():
    data = PackedData(torch.zeros(30, 4, dtype=torch.long), torch.zeros(30, 4, dtype=torch.long),
                      torch.tensor([0] * 10 + [1] * 20))
    sampler = MixtureSampler(data, [3.0, 1.0], seed=0)
    rows = torch.cat([sampler.rows_for_step(s, 8) for s in range(200)])
    assert torch.equal(rows[:8], MixtureSampler(data, [3.0, 1.0], seed=0).rows_for_step(0, 8))
    share = (data.source[rows] == 0).float().mean()
    assert abs(float(share) - 0.75) < 0.03


def test_data_errors_are_clear(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_documents(DataSource(str(tmp_path / "empty.jsonl")))
    (tmp_path / "other.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(DataError, match="fields found: prompt, completion"):
        load_documents(DataSource(str(tmp_path / "other.jsonl")))
    with pytest.raises(DataError, match="does not exist"):
        load_documents(DataSource(str(tmp_path / "missing.jsonl")))
    assert DataSource.parse("a.jsonl:0.7") == DataSource("a.jsonl", 0.7)
    assert DataSource.parse("org/name") == DataSource("org/name", 1.0)


# --------------------------------------------------------------------------------------------- chunked KD


def _tiny_pair(vocab=500, softcap=None, quantize_embeddings=False, tied=True):
    from transformers import Gemma3ForCausalLM

    from builders import tiny_text_config
    from gemma3_qat.qat.prepare import prepare

    torch.manual_seed(0)
    cfg = tiny_text_config(vocab, hidden=32, ffn=64, layers=2, heads=2, kv_heads=1, head_dim=16, sliding_window=16,
                           context=64)
    cfg.final_logit_softcapping = softcap
    cfg.tie_word_embeddings = tied
    student = Gemma3ForCausalLM(cfg)
    if not tied:
        torch.nn.init.normal_(student.lm_head.weight, std=0.05)
    prepare(student, "int4-block", quantize_embeddings=quantize_embeddings)
    teacher = Gemma3ForCausalLM(cfg).eval().requires_grad_(False)
    return student, teacher


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,alpha,softcap,quantize_embeddings,tied", [
    ("full", 0.0, None, False, True), ("full", 0.3, 30.0, True, True), ("sampled", 0.0, None, True, True),
    ("sampled", 0.5, None, False, False), ("topk", 0.0, 30.0, False, True), ("topk", 0.2, None, False, False)])
def test_chunked_kd_loss_equals_the_full_logits_loss(mode, alpha, softcap, quantize_embeddings, tied):
    """kd_loss (heads inside chunks of 7 positions, masked positions dropped) against distillation_loss on the
    model's own full logits: same loss, parts and gradients of every parameter (tied or untied head, fake-quantized
    head, final logit soft-capping)."""
    from gemma3_qat.qat.distill import kd_loss, shift_for_next_token

    student, teacher = _tiny_pair(softcap=softcap, quantize_embeddings=quantize_embeddings, tied=tied)
    ids = torch.randint(0, 500, (3, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = -100
    labels[2, 20:] = -100
    kd = KDConfig(mode, k=16, alpha=alpha, temperature=1.5)
    sample_ids = torch.tensor([3, 4, 9])
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[:, :-1]
    logits, shifted = shift_for_next_token(student(input_ids=ids).logits, labels)
    target = None if mode == "full" else sparse_target(teacher_logits, kd, sample_ids=sample_ids)
    want, want_parts = distillation_loss(logits, shifted, kd, teacher_logits=teacher_logits, target=target,
                                         normalizer=50.0)
    want.backward()
    want_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    loss, parts = kd_loss(student, ids, labels, kd, teacher=teacher, sample_ids=sample_ids, normalizer=50.0, rows=7)
    loss.backward()
    torch.testing.assert_close(loss, want)
    assert set(parts) == set(want_parts)
    for k in parts:
        torch.testing.assert_close(parts[k], want_parts[k])
    got = _grads(student)
    assert set(got) == set(want_grads)
    for name, g in want_grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert student.config.final_logit_softcapping == softcap  # restored after the forward


def test_chunked_kd_loss_from_a_cached_target():
    from gemma3_qat.qat.distill import SparseTarget, kd_loss, shift_for_next_token

    student, teacher = _tiny_pair()
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(2))
    kd = KDConfig("topk", k=8)
    with torch.no_grad():
        target = sparse_target(teacher(input_ids=ids).logits[:, :-1], kd)
    logits, shifted = shift_for_next_token(student(input_ids=ids).logits, ids)
    want, _ = distillation_loss(logits, shifted, kd, target=target)
    want.backward()
    want_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    loss, _ = kd_loss(student, ids, ids, kd, target=SparseTarget(target.ids, target.log_probs), rows=5)
    loss.backward()
    torch.testing.assert_close(loss, want)
    for name, g in want_grads.items():
        torch.testing.assert_close(_grads(student)[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["full", "sampled", "topk"])
def test_chunked_validation_sums_equal_token_metrics(mode):
    from gemma3_qat.qat.distill import shift_for_next_token, token_metrics, validation_sums

    student, teacher = _tiny_pair()
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[1, :15] = -100
    kd = KDConfig(mode, k=16)
    with torch.no_grad():
        logits, shifted = shift_for_next_token(student(input_ids=ids).logits, labels)
        t = teacher(input_ids=ids).logits[:, :-1]
    m = token_metrics(logits, shifted, teacher_logits=t)
    target = None if mode == "full" else sparse_target(t, kd, sample_ids=torch.tensor([0, 1]))
    per = kd_loss_per_token(logits, kd, teacher_logits=t if mode == "full" else None, target=target)
    mask = m["mask"].float()
    want = torch.stack([(m["kl"] * mask).sum(), (per * mask).sum(), (m["top1"] * mask).sum(),
                        (m["nll"] * mask).sum(), mask.sum()])
    got = validation_sums(student, ids, labels, kd, teacher=teacher, sample_ids=torch.tensor([0, 1]), rows=6)
    torch.testing.assert_close(got, want)
    # from a cache: the same KD and top-1 sums, no KL
    cached = validation_sums(student, ids, labels, kd, target=target, teacher_top1=t.argmax(-1), rows=6) \
        if mode != "full" else None
    if cached is not None:
        torch.testing.assert_close(cached[1:], want[1:])
        assert float(cached[0]) == 0.0


def test_no_full_logits_are_materialised(monkeypatch):
    """The student's and teacher's head matmuls only ever see one chunk of positions."""
    from gemma3_qat.qat import head as head_module
    from gemma3_qat.qat.distill import kd_loss

    student, teacher = _tiny_pair()
    seen = []
    real = head_module.OutputHead.matmul

    def spy(self, hidden):
        seen.append(hidden.shape[0])
        return real(self, hidden)

    monkeypatch.setattr(head_module.OutputHead, "matmul", spy)
    ids = torch.randint(0, 500, (4, 40))
    loss, _ = kd_loss(student, ids, ids, KDConfig("full"), teacher=teacher, rows=16)
    loss.backward()
    assert seen and max(seen) <= 16 and sum(seen) == 2 * 4 * 39  # student and teacher, every position once
    assert student.lm_head.__class__.__name__ != "_HeadTap"  # the head is back


@pytest.mark.parametrize("buffer", ["one flush", "several flushes"])
@pytest.mark.parametrize("quantized", [False, True], ids=["body", "body+embedding"])
def test_chunked_kd_loss_under_bf16_autocast(monkeypatch, buffer, quantized):
    """The mixed-precision path (bf16 autocast, on CUDA and on CPUs with native bf16): the head matmul in bf16 as
    autocast would run it, the head's gradient accumulated in fp32 from buffered logit gradients (flushed once, or
    several times); fake-quantized weights reach the matmuls as the quantizer's cached bf16 values."""
    from gemma3_qat.qat import head as head_module
    from gemma3_qat.qat.distill import kd_loss, shift_for_next_token

    if buffer == "several flushes":
        monkeypatch.setattr(head_module, "GRAD_BUFFER_ELEMENTS", 20 * 500)  # 20 rows at vocab 500: 4 flushes
    student, teacher = _tiny_pair(quantize_embeddings=quantized)
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(4))
    kd = KDConfig("full")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[:, :-1]
        logits = student(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    logits, shifted = shift_for_next_token(logits, ids)
    want, _ = distillation_loss(logits, shifted, kd, teacher_logits=t)
    want.backward()
    want_grads = _grads(student)
    student.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = kd_loss(student, ids, ids, kd, teacher=teacher, rows=9)
    loss.backward()
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=0)
    for name, g in want_grads.items():
        got = _grads(student)[name]
        assert got.dtype == torch.float32
        assert (got - g).abs().max() <= 0.02 * g.abs().max() + 1e-6, name


@pytest.mark.parametrize("mode", ["sampled", "topk"])
def test_teacher_targets_equal_the_full_logits_targets(mode):
    """What a teacher cache stores, chunked, equals ``sparse_target`` and the argmax of the full logits."""
    from gemma3_qat.qat.distill import teacher_targets

    _, teacher = _tiny_pair()
    ids = torch.randint(0, 500, (3, 40), generator=torch.Generator().manual_seed(5))
    kd = KDConfig(mode, k=8)
    with torch.no_grad():
        full = teacher(input_ids=ids).logits[:, :-1]
    want = sparse_target(full, kd, sample_ids=torch.tensor([0, 1, 2]))
    got, top1 = teacher_targets(teacher, ids, kd, sample_ids=torch.tensor([0, 1, 2]), rows=11)
    assert torch.equal(got.ids, want.ids) and torch.equal(top1, full.argmax(-1))
    torch.testing.assert_close(got.log_probs, want.log_probs)


FSDP2_SCRIPT = """# FSDP2 on CPU (gloo), 2 ranks: kd_loss's gradients equal the unsharded full-logits reference.
import os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import Gemma3ForCausalLM
from builders import tiny_text_config
from gemma3_qat.qat.distill import KDConfig, kd_loss, distillation_loss, shift_for_next_token, validation_sums
from gemma3_qat.qat.prepare import prepare

dist.init_process_group("gloo")
rank = dist.get_rank()
quant = sys.argv[1] == "1"
def build(seed):
    torch.manual_seed(seed)
    cfg = tiny_text_config(500, hidden=32, ffn=64, layers=2, heads=2, kv_heads=1, head_dim=16,
                           sliding_window=16, context=64)
    return Gemma3ForCausalLM(cfg)
student, ref = build(0), build(0)
for m in (student, ref):
    prepare(m, "int4-block", quantize_embeddings=quant, cache=False)
teacher = build(1).eval().requires_grad_(False)
ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(rank))
kd = KDConfig("full", alpha=0.2)
# reference: unsharded, full logits, this rank's batch
with torch.no_grad():
    t = teacher(input_ids=ids).logits[:, :-1]
logits, sh = shift_for_next_token(ref(input_ids=ids).logits, ids)
want, _ = distillation_loss(logits, sh, kd, teacher_logits=t)
want.backward()
for p in ref.parameters():
    if p.grad is not None:
        dist.all_reduce(p.grad); p.grad /= 2
for layer in student.model.layers:
    fully_shard(layer, reshard_after_forward=True)
fully_shard(student, reshard_after_forward=True)
loss, parts = kd_loss(student, ids, ids, kd, teacher=teacher, rows=7)
loss.backward()
worst = 0.0
for (n, p), (n2, q) in zip(student.named_parameters(), ref.named_parameters()):
    if q.grad is None: continue
    g = p.grad.full_tensor()
    worst = max(worst, float((g - q.grad).abs().max() / (q.grad.abs().max() + 1e-12)))
got, ref_loss = float(loss.detach()), float(want.detach())
assert abs(got - ref_loss) < 1e-5 * abs(ref_loss), (got, ref_loss)
assert worst < 1e-5, worst
print(f"rank {rank} ok {worst:.2e}")
student.eval()
with torch.no_grad():
    s = validation_sums(student, ids, ids, kd, teacher=teacher, rows=7)
assert s[4] == 78
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("quantize_embeddings", [False, True])
def test_chunked_kd_loss_under_fsdp2(tmp_path, quantize_embeddings):
    """FSDP2 (fully_shard per decoder layer and the root, resharded after forward; gloo on the CPU, 2 ranks): the
    fused head reads the gathered (tied, optionally fake-quantized) weight inside the root's forward and returns
    the loss through its outputs, so the sharded gradients equal the unsharded full-logits reference."""
    import os
    import subprocess
    import sys

    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(29500 + 7 * int(quantize_embeddings) + os.getpid() % 400),
                          str(script), str(int(quantize_embeddings))], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(" ok ") == 2, out.stdout
