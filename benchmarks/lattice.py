"""Lattice recovery (issue 16): its speed next to int4-block quantization, and what it buys in llama.cpp.

    python benchmarks/lattice.py [--threads N] [--device cpu|cuda]          # speed, a 2048 x 8192 tensor
    python benchmarks/lattice.py --quality [--workdir /tmp/g3-lattice]      # + KL in llama.cpp, embedded model

Speed: the same 2048 x 8192 Gaussian weight, side by side in one process: ``get_format("int4-block").quantize``
on its fp32 latent values (what the GGUF export of a QAT checkpoint computes per tensor), then ``recover_tensor``
on the bf16 values of its lattice (what recovering a Google-style checkpoint computes instead); best of 3 each,
and the ratio. A recovery no slower than the quantization keeps a 27B recovery within its export's time.

Speed also prints what the naive re-quantization of the same bf16 values gets right (codes, scales) and the
relative squared error of naive, recovered and the bf16 storage itself against the original lattice values.

Quality: a 2-step int4-block QAT run of the embedded model (embedding quantized) is the "original"; its values in
bf16 (``export --to safetensors --layout unquantized --dtype bf16``, no qat.json) are the Google-style checkpoint.
Candidates, each against the original run, in PyTorch (fake-quant forward) and in real llama.cpp (their GGUFs), on
the embedded validation windows: the recovered lattice (``write_recovered_checkpoint``, tie rule q4_0, and the
smallest / largest consistent scales), and the naive path (the bf16 checkpoint re-quantized to Q4_0 by llama.cpp's
rule, embedding too, by our exporter; and in llama.cpp also the way a user without us makes it: llama.cpp's own
``convert_hf_to_gguf.py`` + ``llama-quantize Q4_0``, when scripts/build_llama_tools.sh has built them):
KL(original || candidate) and top-1 agreement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import sys
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture builders (tests/builders.py)


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        if _sync:
            _sync()
        times.append(time.perf_counter() - t)
    return min(times)


_sync = None


def speed(device: str) -> None:
    import torch

    from gemma3_qat.formats import get_format, q4_0_blocks
    from gemma3_qat.lattice import recover_tensor

    global _sync
    if device == "cuda":
        _sync = torch.cuda.synchronize
    fmt = get_format("int4-block")
    w = (torch.randn(2048, 8192, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    qw = fmt.quantize(w)
    stored = fmt.dequantize(qw).to(torch.bfloat16)
    t_quant = best_of(lambda: fmt.quantize(w))
    t_pack = best_of(lambda: q4_0_blocks(qw)) if device == "cpu" else float("nan")
    t_rec = best_of(lambda: recover_tensor(stored))
    lattice = recover_tensor(stored)
    assert lattice.fraction == 1.0
    same = float((lattice.quantized.scales == qw.scales).float().mean())
    naive = fmt.quantize(stored.float())  # llama.cpp's Q4_0 of the bf16 values
    exact = fmt.dequantize(qw)
    rel = {label: float((fmt.dequantize(x) - exact).square().mean() / exact.square().mean())
           for label, x in (("naive", naive), ("recovered", lattice.quantized))}
    rel["bf16 storage"] = float((stored.float() - exact).square().mean() / exact.square().mean())
    naive_exact = (fmt.dequantize(naive).to(torch.bfloat16) == stored).reshape(-1, 32).all(1).float().mean()
    print(f"device {device}, {torch.get_num_threads()} threads, 2048 x 8192 weights")
    print(f"  int4-block quantize (fp32 latent)     {t_quant * 1e3:8.1f} ms")
    print(f"  Q4_0 packing (q4_0_blocks)            {t_pack * 1e3:8.1f} ms")
    print(f"  lattice recovery (bf16 stored values) {t_rec * 1e3:8.1f} ms")
    print(f"  ratio recovery / quantize: {t_rec / t_quant:.2f}")
    print(f"  {lattice.line()}; byte-identical scales {same:.1%}")
    print(f"  naive Q4_0 of the bf16 values: codes equal {float((naive.codes == qw.codes).float().mean()):.2%}, "
          f"scales equal {float((naive.scales == qw.scales).float().mean()):.1%}, blocks reproducing the stored "
          f"values {float(naive_exact):.1%}")
    print("  relative squared error against the original lattice values: "
          + ", ".join(f"{k} {v:.3g}" for k, v in rel.items()))


def quality(workdir: Path) -> None:
    from gemma3_qat.assets import default_model_path
    from gemma3_qat.checkpoint import QATMetadata
    from gemma3_qat.evaluate import evaluation_windows, llama_cpp_logits, pytorch_logits
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.recover import write_recovered_checkpoint
    from gemma3_qat.exporters.safetensors import export_safetensors
    from gemma3_qat.qat.train import TrainConfig, train
    from gemma3_qat.tokenizer import load_tokenizer

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    data = workdir / "text.jsonl"
    import json

    from builders import sample_texts

    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts()[:120]))
    run = train(TrainConfig(model=str(default_model_path()), format="int4-block", quantize_embeddings=True,
                            data=[str(data)], seq_len=64, batch_size=2, micro_batch_size=2, steps=2, lr=1e-3,
                            warmup_steps=1, eval_every=100, eval_rows=2, save_every=100,
                            output=str(workdir / "run")), log=lambda *_: None)
    google = workdir / "google-style"
    export_safetensors(run, google, layout="unquantized", dtype="bf16", log=None)
    for name in ("qat.json", "manifest.json"):
        (google / name).unlink(missing_ok=True)
    t = time.perf_counter()
    result = write_recovered_checkpoint(google, workdir / "recovered", log=None)
    print(f"recovered in {time.perf_counter() - t:.1f} s: {result.lines()[0]}")
    for rule in ("smallest", "largest"):
        write_recovered_checkpoint(google, workdir / f"recovered-{rule}", rule=rule, log=None)
    naive = workdir / "naive"  # the bf16 values with Q4_0's rule applied to them (by our exporter)
    shutil.copytree(google, naive)
    (naive / "qat.json").write_text(QATMetadata(format="int4-block", quantize_embeddings=True).to_json())
    dirs = {"original": run, "recovered": workdir / "recovered", "recovered, smallest D":
            workdir / "recovered-smallest", "recovered, largest D": workdir / "recovered-largest",
            "naive bf16 -> Q4_0": naive}
    files = {label: workdir / f"{i}.gguf" for i, label in enumerate(dirs)}
    for label, directory in dirs.items():
        export_gguf(directory, files[label], log=None)
    labels = {"pytorch": list(dirs), "llama.cpp": list(dirs)}
    from gemma3_qat.runtimes import llama_tools

    if llama_tools.available():  # the path a user without us takes: llama.cpp's own converter and quantizer
        label = "llama.cpp convert + Q4_0"
        f32 = llama_tools.convert_hf(google, workdir / "google-f32.gguf")
        files[label] = llama_tools.quantize(f32, workdir / "llama-q4_0.gguf", "Q4_0", embedding_type="q4_0")
        labels["llama.cpp"].append(label)
    tokenizer = load_tokenizer(str(google))
    windows, _, name = evaluation_windows(tokenizer, seq_len=256, max_windows=16)

    def compare(backend, logits_of, which):
        ref = list(logits_of("original"))
        print(f"{backend}, {len(windows)} windows x 256 tokens of {name}; against the original run:")
        for label in which:
            kl, agree, n = 0.0, 0, 0
            for a, b in zip(ref, list(logits_of(label))):  # a list: run each generator to its end
                p, q = a.log_softmax(-1), b.log_softmax(-1)
                kl += float((p.exp() * (p - q)).sum(-1).sum())
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                n += a.shape[0]
            print(f"  {label:24s} KL mean {kl / n:.3g}, top-1 agreement {100 * agree / n:.2f}%")

    compare("PyTorch (fake-quant forward of each QAT checkpoint)", lambda label: pytorch_logits(dirs[label], windows),
            labels["pytorch"])
    compare("llama.cpp (each GGUF)", lambda label: llama_cpp_logits(files[label], windows, tokenizer),
            labels["llama.cpp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quality", action="store_true", help="also the llama.cpp comparison (embedded model)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/g3-lattice"))
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    speed(args.device)
    if args.quality:
        quality(args.workdir)


if __name__ == "__main__":
    main()
