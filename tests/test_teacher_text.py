"""``gemma3-qat sample-data``: text sampled from the teacher's own, untruncated distribution, reproducibly, written
in the format ``train --data`` reads, with the CLI's refusals one line each."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from gemma3_qat.cli import app
from gemma3_qat.qat.teacher_text import sample_texts, write_teacher_text


@pytest.fixture(scope="module")
def teacher(tiny_text_dir):
    from gemma3_qat.sources import load_gemma3
    from gemma3_qat.tokenizer import load_tokenizer

    return load_gemma3(str(tiny_text_dir), dtype=torch.float32).eval(), load_tokenizer(tiny_text_dir)


def _never(tok):
    return sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id})


def _sample(model, tok, rows, tokens, **kwargs):
    with torch.no_grad():
        return model.generate(torch.full((rows, 1), tok.bos_token_id), do_sample=True, max_new_tokens=tokens,
                              min_new_tokens=tokens, pad_token_id=tok.pad_token_id, suppress_tokens=_never(tok),
                              **kwargs)


def _surprisal_minus_entropy(model, ids, never):
    """Per sampled token: -log p(token) - H(p), p the teacher's next-token distribution without the tokens never
    sampled (BOS, EOS, padding: the distribution sampled from is the renormalised rest)."""
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    logits[..., never] = -math.inf
    logp = torch.log_softmax(logits, -1)
    surprisal = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    return (surprisal - entropy).flatten()


def test_samples_have_the_teachers_entropy(teacher):
    """Unbiased sampling at temperature 1: the mean surprisal of the sampled tokens equals the mean entropy of the
    distributions they were drawn from, within sampling error. Truncated sampling (HF's default top-k 50, or a
    top-p) gives a lower surprisal, and the check is shown to catch it; a wrong temperature moves it too."""
    model, tok = teacher
    texts = sample_texts(model, tok, 24, 24, seed=0, batch_size=24, progress=False)
    torch.manual_seed(0)  # the library's seed scheme: batch 0 of seed 0
    ids = _sample(model, tok, 24, 24, temperature=1.0, top_k=0, top_p=1.0)
    assert texts == [tok.decode(r, skip_special_tokens=False) for r in ids[:, 1:].tolist()]
    diff = _surprisal_minus_entropy(model, ids, _never(tok))
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert abs(float(diff.mean())) < 4 * se, (float(diff.mean()), se)
    torch.manual_seed(0)
    truncated = _surprisal_minus_entropy(model, _sample(model, tok, 24, 24, top_k=50), _never(tok))
    assert float(truncated.mean()) < -4 * se, (float(truncated.mean()), se)


def test_low_temperature_is_greedy_and_seeds_reproduce(teacher):
    model, tok = teacher
    with torch.no_grad():
        greedy = model.generate(torch.full((2, 1), tok.bos_token_id), do_sample=False, max_new_tokens=12,
                                min_new_tokens=12, pad_token_id=tok.pad_token_id, suppress_tokens=_never(tok))
    cold = sample_texts(model, tok, 2, 12, seed=3, temperature=1e-4, batch_size=2, progress=False)
    assert cold == [tok.decode(r, skip_special_tokens=False) for r in greedy[:, 1:].tolist()]
    a = sample_texts(model, tok, 5, 16, seed=1, batch_size=2, progress=False)
    assert a == sample_texts(model, tok, 5, 16, seed=1, batch_size=2, progress=False) and len(a) == 5
    assert a != sample_texts(model, tok, 5, 16, seed=2, batch_size=2, progress=False)


def test_written_file_trains_and_is_not_overwritten(tiny_text_dir, tmp_path):
    from gemma3_qat.qat.data import DataSource, build_data
    from gemma3_qat.tokenizer import load_tokenizer

    out = tmp_path / "teacher.jsonl"
    write_teacher_text(out, model=str(tiny_text_dir), rows=6, tokens=40, batch_size=4, progress=False,
                       log=lambda *_: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(set(r) == {"text"} and r["text"] for r in rows)
    train, valid = build_data([DataSource(str(out))], load_tokenizer(tiny_text_dir), 32, log=lambda *_: None)
    assert len(train) + len(valid) >= 6  # ~40 tokens a row, re-tokenized, packed into rows of 32
    before = out.read_bytes()
    runner = CliRunner()
    refused = runner.invoke(app, ["sample-data", "-o", str(out), "--model", str(tiny_text_dir), "--rows", "2"])
    assert refused.exit_code != 0 and out.read_bytes() == before
    assert "already exists; pass --force" in str(refused.exception)
    done = runner.invoke(app, ["sample-data", "-o", str(out), "--model", str(tiny_text_dir), "--rows", "2",
                               "--tokens", "8", "--force"])
    assert done.exit_code == 0, done.output
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"rows": 0}, "must be positive"), ({"temperature": 0.0}, "must be positive"),
    ({"tokens": 10**6}, "beyond the model's context"),
])
def test_bad_arguments_are_one_line_errors(teacher, kwargs, message):
    from gemma3_qat.errors import InputError

    model, tok = teacher
    args = {"rows": 2, "tokens": 4, **kwargs}
    with pytest.raises(InputError, match=message):
        sample_texts(model, tok, args.pop("rows"), args.pop("tokens"), progress=False, **args)


REAL_TOKENIZER = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "gemma3-tokenizer"


@pytest.mark.skipif(not (REAL_TOKENIZER / "tokenizer.json").exists(),
                    reason=f"Google's Gemma 3 tokenizer is not at {REAL_TOKENIZER}")
def test_samples_with_the_real_262k_tokenizer_train(tmp_path):
    """The real vocabulary (262,144 rows) and Google's tokenizer saved without ``tokenizer.model``: sampled rows
    hold no BOS / EOS / padding of their own, and ``train``'s data path reads them back."""
    from builders import build_random_gemma3, tiny_architecture
    from gemma3_qat.qat.data import DataSource, build_data
    from gemma3_qat.tokenizer import load_tokenizer

    model_dir = build_random_gemma3(tmp_path / "model", tiny_architecture(262_144, hidden=64, ffn=128, layers=1),
                                    REAL_TOKENIZER)
    out = write_teacher_text(tmp_path / "t.jsonl", model=str(model_dir), rows=4, tokens=24, batch_size=4,
                             progress=False, log=lambda *_: None)
    tok = load_tokenizer(model_dir)
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(texts) == 4
    never = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert not never & {i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]}
    train, valid = build_data([DataSource(str(out))], tok, 16, log=lambda *_: None)
    assert len(train) + len(valid) >= 4
