"""Time of fake quantization relative to one forward matmul of the same weight, measured side by side in one run.

    python benchmarks/fake_quant.py [--out 2048 --in 8192 --tokens 8192 512 --repeat 5]

Prints, per format, median fake_quantize time / median time of `x @ W.T` with an N-token batch, for our three
formats and llama.cpp's lattices (ggml's reference quantizers, exact: q4_k, q6_k, q5_0, q8_0-lattice), torchao's
int4 group-32 fake-quantizer (the peer) and our per-step cache hit (what a gradient-accumulation micro-step or a
checkpoint recompute pays). Targets at 8,192 tokens: <= 0.25x for int4, <= 0.6x for sfp8, <= 0.5x for the
lattices. (A mixture such as q4_k_m has no numerics of its own: each tensor costs its lattice's.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402

from gemma3_qat.formats import FORMATS  # noqa: E402
from gemma3_qat.qat.fake_quant import FakeQuantizer  # noqa: E402


def median_time(fn, repeat: int, sync=lambda: None) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=int, default=2048)
    p.add_argument("--in", dest="inp", type=int, default=8192)
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 512])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    w = torch.randn(args.out, args.inp, device=args.device) * 0.02
    sync = torch.cuda.synchronize if w.is_cuda else (lambda: None)
    candidates = {name: (lambda f=f: f.fake_quantize_values(w)) for name, f in FORMATS.items() if not f.is_mixture}
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

        peer = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True))
        candidates["torchao int4 g32 (peer)"] = lambda: peer(w)
    except Exception as e:  # torchao missing or its API moved: say so, keep measuring ours
        print(f"# torchao peer unavailable: {e}")
    cached = FakeQuantizer("int4-block")
    cached.quantized_values(w)
    candidates["int4-block, cache hit"] = lambda: cached.quantized_values(w)

    quant_times = {name: median_time(fn, args.repeat, sync) for name, fn in candidates.items()}
    where = torch.cuda.get_device_name() if w.is_cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"# weight {args.out}x{args.inp} fp32, {where}, torch {torch.__version__}")
    header = f"{'format':<26}{'fake-quant ms':>14}" + "".join(f"{f'/ matmul@{n}':>16}" for n in args.tokens)
    print(header)
    matmul = {}
    for n in args.tokens:
        x = torch.randn(n, args.inp, device=args.device)
        matmul[n] = median_time(lambda: x @ w.T, args.repeat, sync)
    for name, t in quant_times.items():
        print(f"{name:<26}{t * 1e3:>14.1f}" + "".join(f"{t / matmul[n]:>15.3f}x" for n in args.tokens))
    print("# matmul ms: " + ", ".join(f"{n} tokens {matmul[n] * 1e3:.1f}" for n in args.tokens))


if __name__ == "__main__":
    main()
