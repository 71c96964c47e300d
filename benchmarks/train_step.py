"""Training-step cost of QAT, measured side by side in one run (each variant in its own process, for peak RSS).

    python benchmarks/train_step.py [--steps 4] [--batches 2 8]
    python benchmarks/train_step.py --shape 270m [--steps 3] [--batches 2]

``--shape 270m``: random weights at the real gemma-3-270m configuration (hidden 640, 18 layers, 4 heads / 1 KV
head of 256, window 512, FFN 2048, vocab 262,144: the embedding is 168M of its 268M parameters), sequences of 256
tokens. Variants, each in its own process: ``plain`` (next-token fine-tuning of the same model and micro-batch,
no fake quantization, the logits and loss as transformers computes them), ``kd-full`` / ``kd-sampled`` /
``kd-topk`` (int4-block QAT with the live teacher, ``distill.kd_loss``: chunked, heads inside the chunk) and
``kd-cache`` (the same from a top-k teacher cache). Each runs its steps (the first a warm-up) and then the
trainer's validation of one micro-batch (``distill.validation_sums``), and prints the median step time, the
peak RSS (VmHWM), its growth over the process after imports, and for the KD variants the peak that
``gemma3-qat memory --training --model 270m --device cpu`` predicts. Targets: KD peak <= 1.25x plain; step
time <= 1.5x plain with a live teacher, <= 1.1x from a cache.

At a Gemma 3 shape (vocab 8192, hidden 1024, FFN 4096, 6 layers, 8 heads, 4 KV heads, head_dim 128, sequences of
256 tokens, AdamW, fp32, this CPU), for a batch of 2 sequences and 4x that, prints the median step time of:

  plain      the same step without fake quantization (next-token loss)
  qat        our int4-block fake quantization (next-token loss)       -> (a) qat / plain, target <= 1.15
  torchao    torchao's int4 group-32 QAT (QATConfig + IntxFakeQuantizeConfig)   -> (b) the peer's ratio
  kd-live    QAT with the live teacher (topk KD, k=256)
  kd-cache   QAT from a teacher cache (same targets)                   -> (c) kd-cache / kd-live, target <= 0.8

and (d) the peak RSS of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture builders (tests/builders.py)

SHAPE = dict(vocab=8192, hidden=1024, ffn=4096, layers=6, heads=8, kv_heads=4, head_dim=128)
SEQ = 256
VARIANTS = ("plain", "qat", "torchao", "kd-live", "kd-cache")
VARIANTS_270M = ("plain", "kd-full", "kd-sampled", "kd-topk", "kd-cache")
KD_K = 256


def config_270m():
    """The gemma-3-270m config: ``models.hf_config`` of the named size, or the same numbers built here."""
    from gemma3_qat import models

    if "270m" in models.GEMMA3_SHAPES:
        return models.hf_config(models.GEMMA3_SHAPES["270m"])
    from builders import tiny_text_config

    config = tiny_text_config(262_144, hidden=640, ffn=2048, layers=18, heads=4, kv_heads=1, head_dim=256,
                              sliding_window=512, context=32_768)
    config.query_pre_attn_scalar = 256
    return config


def build_model(seed: int, shape: str = "default"):
    import torch
    from transformers import Gemma3ForCausalLM

    from builders import tiny_text_config

    torch.manual_seed(seed)
    if shape == "270m":
        config = config_270m()
    else:
        config = tiny_text_config(SHAPE["vocab"], hidden=SHAPE["hidden"], ffn=SHAPE["ffn"], layers=SHAPE["layers"],
                                  heads=SHAPE["heads"], kv_heads=SHAPE["kv_heads"], head_dim=SHAPE["head_dim"],
                                  sliding_window=128, context=1024)
    config.use_cache = False
    return Gemma3ForCausalLM(config).train()


def vocab_of(shape: str) -> int:
    return 262_144 if shape == "270m" else SHAPE["vocab"]


def run_variant_270m(variant: str, batch: int, steps: int, cache_dir: str) -> dict:
    """One 270m variant: steps (the first a warm-up), then the trainer's validation of one micro-batch."""
    import torch
    import torch.nn.functional as F

    from gemma3_qat.qat.distill import KDConfig, kd_loss, validation_sums
    from gemma3_qat.qat.prepare import prepare

    base = peak_rss_mb()  # torch and transformers loaded: what the model, optimizer and step add comes after
    mode = variant.removeprefix("kd-")
    kd = KDConfig("topk" if mode == "cache" else mode, k=KD_K) if variant != "plain" else None
    student = build_model(0, "270m")
    teacher = cache = None
    if variant != "plain":
        prepare(student, "int4-block")
        if mode == "cache":
            from gemma3_qat.qat.teacher_cache import TeacherCache

            cache = TeacherCache.open(cache_dir, expected={})
        else:
            teacher = build_model(1, "270m").eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)  # the rows build_cache drew: train rows, then the validation rows
    data = torch.randint(0, vocab_of("270m"), (steps * batch + batch, SEQ), generator=gen)
    times = []
    for step in range(steps):
        rows = torch.arange(step * batch, (step + 1) * batch)
        x = data[rows]
        t0 = time.perf_counter()
        if variant == "plain":
            logits = student(input_ids=x).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            del logits
        else:
            target = cache.target(rows, split="train", device="cpu") if cache is not None else None
            loss, _ = kd_loss(student, x, x, kd, teacher=teacher, target=target, sample_ids=rows)
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_peak = peak_rss_mb()
    student.eval()
    rows = torch.arange(batch)  # the validation split's first rows
    x = data[steps * batch:]
    with torch.no_grad():
        if variant == "plain":
            logits = student(input_ids=x).logits[:, :-1]
            F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            del logits
        else:
            cached = {}
            if cache is not None:
                cached = {"target": cache.target(rows, split="valid", device="cpu"),
                          "teacher_top1": cache.top1(rows, split="valid", device="cpu")}
            validation_sums(student, x, x, kd, teacher=teacher, sample_ids=rows, **cached)
    peak = peak_rss_mb()
    return {"variant": variant, "batch": batch, "step_s": statistics.median(times[1:] or times),
            "peak_rss_mb": peak, "step_peak_rss_mb": step_peak, "base_rss_mb": base}


def predicted_peak_mb(variant: str, batch: int) -> float | None:
    """The training-memory planner's peak for a KD variant (CPU: fp32 teacher and compute)."""
    if variant == "plain":
        return None
    from gemma3_qat.memory import model_spec, spec_from_hf_config, training_memory
    from gemma3_qat.models import GEMMA3_SHAPES

    spec = model_spec("270m") if "270m" in GEMMA3_SHAPES else spec_from_hf_config(config_270m(), "270m", "bench")
    mode = variant.removeprefix("kd-")
    opts = dict(teacher="cache", kd="topk") if mode == "cache" else dict(teacher="live", kd=mode)
    return training_memory(spec, seq_len=SEQ, micro_batch=batch, device="cpu", kd_k=KD_K, **opts).peak / 2**20


def run_variant(variant: str, batch: int, steps: int, cache_dir: str) -> dict:
    import torch
    import torch.nn.functional as F

    from gemma3_qat.qat.distill import KDConfig, distillation_loss, shift_for_next_token, sparse_target
    from gemma3_qat.qat.prepare import prepare

    kd = KDConfig("topk", k=256)
    student = build_model(0)
    if variant in ("qat", "kd-live", "kd-cache"):
        prepare(student, "int4-block")
    elif variant == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        quantize_(student, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
    teacher = build_model(1).eval() if variant == "kd-live" else None
    cache = None
    if variant == "kd-cache":
        from gemma3_qat.qat.teacher_cache import TeacherCache

        cache = TeacherCache.open(cache_dir, expected={})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, SHAPE["vocab"], (steps * batch, SEQ), generator=gen)
    times = []
    for step in range(steps):
        rows = torch.arange(step * batch, (step + 1) * batch)
        x = data[rows]
        t0 = time.perf_counter()
        logits = student(input_ids=x).logits
        logits, labels = shift_for_next_token(logits, x)
        if variant in ("plain", "qat", "torchao"):
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        else:
            if teacher is not None:
                with torch.no_grad():
                    target = sparse_target(teacher(input_ids=x).logits[:, :-1], kd)
            else:
                target = cache.target(rows, split="train", device="cpu")
            loss, _ = distillation_loss(logits, labels, kd, target=target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "batch": batch, "step_s": statistics.median(times[1:]),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry over the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def build_cache(cache_dir: Path, rows: int, shape: str = "default", valid_rows: int = 1) -> None:
    """A top-k teacher cache of the rows the variants train on (the same seed draws the same ids); its validation
    split: the rows after them."""
    import torch

    from gemma3_qat.qat.data import PackedData
    from gemma3_qat.qat.distill import KDConfig
    from gemma3_qat.qat.teacher_cache import build_teacher_cache

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_of(shape), (rows + valid_rows, SEQ), generator=gen)
    data = PackedData(ids[:rows], ids[:rows].clone(), torch.zeros(rows, dtype=torch.long))
    valid = PackedData(ids[rows:], ids[rows:].clone(), torch.zeros(valid_rows, dtype=torch.long))
    with torch.no_grad():
        build_teacher_cache(build_model(1, shape).eval(), data, valid, KDConfig("topk", k=KD_K), cache_dir, {},
                            batch_size=2, log=lambda *_: None)


def main_270m(args) -> None:
    import torch

    batches = args.batches if args.batches != [2, 8] else [2]
    print(f"# gemma-3-270m shape (random weights, vocab 262,144), {SEQ} tokens per sequence, AdamW fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {args.steps} steps per variant (the first "
          "a warm-up), then one validation micro-batch")
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    results = {}
    for batch in batches:
        with tempfile.TemporaryDirectory() as tmp:
            cache_dir = Path(tmp) / "cache"
            build_cache(cache_dir, args.steps * batch, "270m", valid_rows=batch)
            for variant in VARIANTS_270M:
                out = subprocess.run([sys.executable, __file__, "--shape", "270m", "--variant", variant, "--batch",
                                      str(batch), "--steps", str(args.steps), "--cache", str(cache_dir)],
                                     capture_output=True, text=True, env=env)
                if out.returncode:
                    raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
                results[(batch, variant)] = r = json.loads(out.stdout.strip().splitlines()[-1])
                r["predicted_mb"] = predicted_peak_mb(variant, batch)
    print(f"{'batch':>5} {'variant':<11} {'step s':>7} {'x plain':>7} {'peak RSS MB':>11} {'x plain':>7} "
          f"{'growth MB':>9} {'predicted':>9} {'pred/growth':>11}")
    for (batch, variant), r in results.items():
        plain = results[(batch, "plain")]
        growth = r["peak_rss_mb"] - r["base_rss_mb"]
        pred = r["predicted_mb"]
        print(f"{batch:>5} {variant:<11} {r['step_s']:>7.2f} {r['step_s'] / plain['step_s']:>7.3f} "
              f"{r['peak_rss_mb']:>11.0f} {r['peak_rss_mb'] / plain['peak_rss_mb']:>7.3f} {growth:>9.0f} "
              + (f"{pred:>9.0f} {pred / growth:>11.3f}" if pred else f"{'-':>9} {'-':>11}"))
    print()
    for batch in batches:
        plain = results[(batch, "plain")]
        for variant in VARIANTS_270M[1:]:
            r = results[(batch, variant)]
            mem, t = r["peak_rss_mb"] / plain["peak_rss_mb"], r["step_s"] / plain["step_s"]
            t_target = 1.1 if variant == "kd-cache" else 1.5
            growth = r["peak_rss_mb"] - r["base_rss_mb"]
            print(f"batch {batch} {variant:<10}: peak {mem:.3f}x plain (target <= 1.25: "
                  f"{'holds' if mem <= 1.25 else 'MISSED'}), step {t:.3f}x plain (target <= {t_target}: "
                  f"{'holds' if t <= t_target else 'MISSED'}), predicted/measured growth "
                  f"{r['predicted_mb'] / growth:.3f} (target within 15%: "
                  f"{'holds' if abs(r['predicted_mb'] / growth - 1) <= 0.15 else 'MISSED'})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="steps per variant (the first is a warm-up)")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--shape", choices=("default", "270m"), default="default",
                   help="default: the small shape above; 270m: the real gemma-3-270m configuration")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:  # child process
        run = run_variant_270m if args.shape == "270m" else run_variant
        print(json.dumps(run(args.variant, args.batch, args.steps, args.cache)))
        return
    if args.shape == "270m":
        main_270m(args)
        return

    import torch

    print(f"# shape {SHAPE}, {SEQ} tokens per sequence, AdamW fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        build_cache(cache_dir, args.steps * max(args.batches))
        results = {}
        for batch in args.batches:
            for variant in VARIANTS:
                out = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(batch),
                                      "--steps", str(args.steps), "--cache", str(cache_dir)],
                                     capture_output=True, text=True, check=True)
                results[(batch, variant)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'batch':>5} {'variant':<9} {'step s':>8} {'peak RSS MB':>12}")
    for (batch, variant), r in results.items():
        print(f"{batch:>5} {variant:<9} {r['step_s']:>8.3f} {r['peak_rss_mb']:>12.0f}")
    print()
    for batch in args.batches:
        t = {v: results[(batch, v)]["step_s"] for v in VARIANTS}
        print(f"batch {batch} x {SEQ}: (a) qat/plain {t['qat'] / t['plain']:.3f} (target <= 1.15)   "
              f"(b) torchao/plain {t['torchao'] / t['plain']:.3f}   "
              f"(c) kd-cache/kd-live {t['kd-cache'] / t['kd-live']:.3f} (target <= 0.8)")


if __name__ == "__main__":
    main()
