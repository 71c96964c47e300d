"""Training-step cost of QAT, measured side by side in one run (each variant in its own process, for peak RSS).

    python benchmarks/train_step.py [--steps 4] [--batches 2 8]

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

SHAPE = dict(vocab=8192, hidden=1024, ffn=4096, layers=6, heads=8, kv_heads=4, head_dim=128)
SEQ = 256
VARIANTS = ("plain", "qat", "torchao", "kd-live", "kd-cache")


def build_model(seed: int):
    import torch
    from transformers import Gemma3ForCausalLM

    from gemma3_qat.embedded.tiny import tiny_text_config

    torch.manual_seed(seed)
    config = tiny_text_config(SHAPE["vocab"], hidden=SHAPE["hidden"], ffn=SHAPE["ffn"], layers=SHAPE["layers"],
                              heads=SHAPE["heads"], kv_heads=SHAPE["kv_heads"], head_dim=SHAPE["head_dim"],
                              sliding_window=128, context=1024)
    return Gemma3ForCausalLM(config).train()


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


def build_cache(cache_dir: Path, rows: int) -> None:
    import torch

    from gemma3_qat.qat.data import PackedData
    from gemma3_qat.qat.distill import KDConfig
    from gemma3_qat.qat.teacher_cache import build_teacher_cache

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab"], (rows, SEQ), generator=gen)
    data = PackedData(ids, ids.clone(), torch.zeros(rows, dtype=torch.long))
    empty = PackedData(ids[:1], ids[:1].clone(), torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        build_teacher_cache(build_model(1).eval(), data, empty, KDConfig("topk", k=256), cache_dir, {}, log=lambda *_: None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="steps per variant (the first is a warm-up)")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args.batch, args.steps, args.cache)))
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
