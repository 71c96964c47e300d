"""What exact llama.cpp fake-quantization costs (``gemma3_qat.formats.kquants``) next to the matmul it precedes.

    python benchmarks/kquant_cost.py [--threads N] [--rows 2048] [--cols 8192] [--tokens 8192] [--repeat 3]

For one fp32 weight ``w`` ``[rows, cols]`` (default 2048 x 8192, Gaussian, std 0.02) on the CPU: the time of
``fake_quantize_X(w)`` for X in q4_k, q6_k, q5_0, q8_0, beside one forward matmul of that weight at ``tokens``
tokens (``x[tokens, cols] @ w.T``), and their ratio. Median of ``repeat`` runs each, in one process, after one
warm-up run; wall time, and process CPU time beside it (steadier on a shared machine). A ratio of 0.5 or less means the exact lattice adds at most half a forward matmul of that layer per
optimizer step (the weight is fake-quantized once per step; the matmul runs once per micro-batch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemma3_qat.formats import kquants

TYPES = ("q4_k", "q6_k", "q5_0", "q8_0")


def median_time(fn, repeat: int) -> tuple[float, float]:
    """Median wall time and median process CPU time (all threads) of ``fn()``, after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def matmul_time(w: torch.Tensor, x: torch.Tensor, repeat: int) -> tuple[float, float]:
    return median_time(lambda: x @ w.T, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=g) * 0.02

    with torch.no_grad():
        mm_wall, mm_cpu = matmul_time(w, torch.randn(args.tokens, args.cols, generator=g), args.repeat)
        print(f"weight {args.rows} x {args.cols} fp32, {torch.get_num_threads()} thread(s), median of {args.repeat} "
              f"(wall time; process CPU time in brackets)")
        print(f"matmul x[{args.tokens}, {args.cols}] @ w.T: {mm_wall:.3f} s [{mm_cpu:.3f} s]")
        for name in TYPES:
            fq = getattr(kquants, f"fake_quantize_{name}")
            t_wall, t_cpu = median_time(lambda fq=fq: fq(w), args.repeat)
            print(f"fake_quantize_{name}: {t_wall:.3f} s [{t_cpu:.3f} s] = {t_wall / mm_wall:.2f}x the matmul "
                  f"[{t_cpu / mm_cpu:.2f}x]")


if __name__ == "__main__":
    main()
