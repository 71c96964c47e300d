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
