"""The real shapes end to end: ``google/gemma-3-270m``'s exact configuration (random bf16 weights, Google's
262,144-piece tokenizer from ``tokenizer.json`` alone, as the release ships it) and a multimodal config with the
real 262,208-row embedding (depth and width reduced), through 2 steps of sampled-KD QAT, GGUF export (+ mmproj) and
real llama.cpp.

The reference is the PyTorch fake-quant student: llama.cpp must give its logits (mean KL <= 1e-3) on windows
longer than the 270M's 512-token sliding window. Random weights give nearly flat logits (std ~0.5), so top-1
agreement means little there: printed, not gated. The tokenizer's own parity with HF (2,000+ strings) is
``tests/test_vocab*.py``; here only the probe that ``gemma3-qat eval`` checks before it trusts a GGUF.
"""

import resource
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

from builders import TINY_SIGLIP, build_random_gemma3, sample_texts, tiny_architecture  # noqa: E402
from gemma3_qat.models import GEMMA3_SHAPES  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "gemma3-tokenizer"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(),
                                 reason=f"Google's Gemma 3 tokenizer is not at {TOKENIZER}")]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


class Clock:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        print(f"  {what}: {now - self.t:.1f} s (peak RSS so far {rss_gb():.1f} GB)")
        self.t = now


def qat_then_gguf(tmp_path: Path, arch, *, seq_len: int, windows: int, clock: Clock):
    """Build the checkpoint, train 2 sampled-KD steps (int4-block, embedding quantized as the recipe does), export
    GGUF; return (run dir, gguf path, eval windows [N, seq_len] of real text)."""
    import json

    from gemma3_qat.evaluate import evaluation_windows
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.qat.train import TrainConfig, train
    from gemma3_qat.tokenizer import load_tokenizer

    model = build_random_gemma3(tmp_path / "model", arch, TOKENIZER)
    assert not (model / "tokenizer.model").exists() and (model / "tokenizer.json").exists()
    clock.lap(f"random {arch.name} checkpoint (bf16 safetensors, tokenizer.json only)")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts()[:40]))
    config = TrainConfig(model=str(model), format="int4-block", quantize_embeddings=True, data=[str(data)],
                         kd="sampled", kd_k=64, seq_len=64, batch_size=1, micro_batch_size=1, steps=2, lr=1e-4,
                         warmup_steps=1, eval_every=100, eval_rows=1, save_every=100, output=str(tmp_path / "run"))
    run = train(config, log=lambda *_: None)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("step") == 2 for m in metrics)
    clock.lap("2 steps of sampled-KD QAT (int4-block, embedding on the grid)")
    gguf = tmp_path / "m.gguf"
    export_gguf(run, gguf, log=None)
    clock.lap(f"GGUF export ({gguf.stat().st_size / 1e6:.0f} MB)")
    ids, labels, _ = evaluation_windows(load_tokenizer(run), seq_len=seq_len, max_windows=windows)
    assert ids.shape == (windows, seq_len)
    return run, gguf, ids


def llama_cpp_vs_student(run: Path, gguf: Path, ids: torch.Tensor, clock: Clock) -> tuple[float, float]:
    """Mean KL(student || llama.cpp) and top-1 agreement over every position of ``ids``, one window at a time."""
    from gemma3_qat.evaluate import TOKENIZER_PROBE, LlamaCppModel, pytorch_logits
    from gemma3_qat.qat.distill import token_metrics
    from gemma3_qat.tokenizer import load_tokenizer

    kl_sum, agree, n = 0.0, 0.0, 0
    with LlamaCppModel(gguf, n_ctx=ids.shape[1]) as llm:
        probe = (load_tokenizer(run)(TOKENIZER_PROBE).input_ids, llm.tokenize(TOKENIZER_PROBE))
        for window, student in zip(ids, pytorch_logits(run, ids), strict=True):
            theirs = torch.from_numpy(llm.logits(window.tolist()))
            everywhere = torch.zeros(len(window), dtype=torch.long)  # no label masked: every position compared
            m = token_metrics(theirs, everywhere, teacher_logits=student)
            kl_sum += float(m["kl"].sum())
            agree += float(m["top1"].sum())
            n += len(window)
            print(f"    window: student logit std {float(student.std()):.3f}, KL {float(m['kl'].mean()):.2e}")
            del theirs, student, m
    clock.lap(f"llama.cpp vs PyTorch fake-quant student, {len(ids)} windows of {ids.shape[1]} tokens")
    # the probe `gemma3-qat eval` checks: chat turns, code, whitespace runs, digits, non-Latin text
    assert probe[0] == probe[1], "llama.cpp tokenizes the eval probe differently from transformers"
    return kl_sum / n, agree / n


def test_gemma3_270m_shape_trains_exports_and_runs_in_llama_cpp(tmp_path):
    """The exact gemma-3-270m configuration: 2 QAT steps, Q4_0 GGUF, llama.cpp == the fake-quant student."""
    from gemma3_qat.gguf_file import open_gguf

    clock = Clock()
    arch = GEMMA3_SHAPES["270m"]
    print(f"\n270m: {arch.layers} layers, hidden {arch.hidden}, vocab {arch.vocab:,}, window {arch.sliding_window}")
    run, gguf, ids = qat_then_gguf(tmp_path, arch, seq_len=arch.sliding_window + 64, windows=2, clock=clock)
    fields = open_gguf(gguf).fields
    assert fields["gemma3.attention.sliding_window"].contents() == 512
    assert fields["gemma3.context_length"].contents() == 32_768
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 262_144  # one piece per embedding row
    kl, top1 = llama_cpp_vs_student(run, gguf, ids, clock)
    print(f"  270m: mean KL(student || llama.cpp) {kl:.2e}, top-1 agreement {100 * top1:.1f}% (not gated: random "
          "weights give flat logits)")
    assert kl <= 1e-3


def test_multimodal_with_the_real_262208_row_embedding_exports_text_and_mmproj(tmp_path):
    """A 4B-style checkpoint (SigLIP tower + projector) at the released 262,208 embedding rows, reduced in depth and
    width: QAT, GGUF + mmproj, llama.cpp == the student; the mmproj holds exactly the frozen tower."""
    from gemma3_qat import memory as mem
    from gemma3_qat.gguf_file import open_gguf

    clock = Clock()
    arch = tiny_architecture(262_208, hidden=128, ffn=256, layers=6, heads=2, kv_heads=1, head_dim=64,
                             sliding_window=32, context=1024, vision=TINY_SIGLIP)
    print(f"\nmultimodal: {arch.layers} layers, hidden {arch.hidden}, embedding rows {arch.vocab:,}")
    run, gguf, ids = qat_then_gguf(tmp_path, arch, seq_len=96, windows=2, clock=clock)
    mmproj = gguf.with_name(f"mmproj-{gguf.name}")
    assert mmproj.exists()
    text, vision = mem.measure_gguf(gguf), mem.measure_gguf(mmproj)
    assert text.exact and vision.exact and vision.architecture == "clip"
    predicted = mem.weight_bytes(mem.model_spec(str(run)), mem.WeightOptions("int4-block", "gguf"))
    assert vision.actual_tensor_bytes == predicted.by_group["vision"] + predicted.by_group["projector"]
    tokens = open_gguf(gguf).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 262_208 and tokens[262_144] == "<image_soft_token>"  # one piece per embedding row
    kl, top1 = llama_cpp_vs_student(run, gguf, ids, clock)
    print(f"  multimodal: mean KL(student || llama.cpp) {kl:.2e}, top-1 agreement {100 * top1:.1f}%")
    assert kl <= 1e-3
