"""``gemma3-qat eval`` streams: teacher and candidate logits one forward at a time, the same numbers as holding them
all; the tokenizer-mismatch message blames the GGUF's vocabulary when the file came from the reference."""

import shutil
import weakref

import pytest
import torch

from gemma3_qat import evaluate as ev
from gemma3_qat.tokenizer import load_tokenizer


def test_logits_batch_keeps_one_forward_within_the_budget():
    windows = torch.zeros(32, 256, dtype=torch.long)
    assert ev.logits_batch(windows, 262_144) == 1  # 268 MB per window at Gemma's vocabulary
    assert ev.logits_batch(windows, 4096) == 8  # small vocabularies batch as before
    assert ev.logits_batch(windows, 10**9) == 1  # never zero


def test_eval_streams_teacher_logits_and_gives_the_numbers_of_holding_them_all(qat_run, tiny_text_dir, tmp_path,
                                                                               monkeypatch):
    shutil.copytree(qat_run(tiny_text_dir, "int4-block", False), tmp_path / "ckpt")
    windows, labels, _ = ev.evaluation_windows(load_tokenizer(tiny_text_dir), seq_len=64, max_windows=6)
    # the reference: every teacher logit in a list, as evaluate() did
    held = list(ev.pytorch_logits(tiny_text_dir, windows))
    ppl, kl, kl99, top1, n = ev.compare_logits(ev.pytorch_logits(tmp_path / "ckpt", windows), held, labels)
    t_ppl = ev.compare_logits(iter(held), held, labels)[0]

    alive, peak, calls = weakref.WeakSet(), [0], []
    real = ev.model_logits

    def tracked(model, w, batch=None):
        calls.append(model)
        for row in real(model, w, batch=1):  # one window per forward: at most a window of each side alive
            alive.add(row)
            peak[0] = max(peak[0], len(alive))
            yield row
            del row

    monkeypatch.setattr(ev, "model_logits", tracked)
    report = ev.evaluate([tmp_path / "ckpt"], teacher=str(tiny_text_dir), seq_len=64, max_windows=6,
                         log=lambda *_: None)
    assert report.windows == len(windows) == 6
    # one window of each side, + the next one while zip still holds the last pair: never the whole set (12)
    assert peak[0] <= 3
    assert len(calls) == 2 and calls[0] is not calls[1]  # the teacher's stream and the candidate's
    (row,) = report.results
    assert row.kl_mean == pytest.approx(kl, rel=1e-6, abs=1e-9) and row.kl_p99 == pytest.approx(kl99, rel=1e-6)
    assert row.perplexity == pytest.approx(ppl, rel=1e-6) and row.top1 == top1 and row.tokens == n
    assert report.teacher_perplexity == pytest.approx(t_ppl, rel=1e-6)


def test_tokenizer_mismatch_blames_the_right_thing(tmp_path):
    ours, theirs = [2, 10, 11, 12], [2, 10, 99, 12]
    same = ev.tokenizer_mismatch(tmp_path / "m.gguf", ours, theirs, tmp_path, str(tmp_path))
    assert "although the file was exported from it" in same and "re-export" in same
    assert "first difference at token 2: 11 in transformers, 99 in llama.cpp" in same
    assert "--teacher" not in same  # the user did evaluate against the right checkpoint
    other = ev.tokenizer_mismatch(tmp_path / "m.gguf", ours, theirs, "google/gemma-3-1b-pt", "google/gemma-3-270m")
    assert "evaluate it with --teacher google/gemma-3-270m" in other
    unknown = ev.tokenizer_mismatch(tmp_path / "m.gguf", ours, ours[:3], tmp_path, None)
    assert "3 in llama.cpp" not in unknown and "end in llama.cpp" in unknown and "pass the checkpoint" in unknown
    assert all("tokenizer differs" in m and "\n" not in m for m in (same, other, unknown))
