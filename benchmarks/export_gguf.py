"""GGUF export time and peak memory at the full Gemma 3 1B shape (random weights), in one run.

    python benchmarks/export_gguf.py [--workdir /tmp/g3-bench] [--keep]

Writes a QAT checkpoint as `train` does (fp32 latent weights, ~4 GB, int4-block, embedding quantized), exports it
to GGUF in a child process and prints: checkpoint size, export seconds, throughput (MB/s of input weights, target
>= 100), peak RSS above the interpreter's baseline (target <= 1.5 GB), output size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture builders (tests/builders.py)


def status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries it over fork + exec, so a child
    would report its parent's peak (here: the parent that built the 4 GB checkpoint)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def make_checkpoint(out: Path, arch=None) -> None:
    """A QAT checkpoint of ``arch`` (default: the released 1B shape): its config and tensors from the one
    architecture record (``gemma3_qat.models``), random matmuls and embedding, zero norms."""
    import torch
    from safetensors.torch import save_file

    from gemma3_qat.checkpoint import QATMetadata
    from builders import build_tokenizer
    from gemma3_qat.models import GEMMA3_SHAPES, hf_config, model_tensors

    arch = arch or GEMMA3_SHAPES["1b"]
    out.mkdir(parents=True, exist_ok=True)
    hf_config(arch).save_pretrained(out)
    build_tokenizer(out)  # a small SentencePiece model; the exporter pads the vocabulary to the embedding's rows
    g = torch.Generator().manual_seed(0)
    tensors = {t.name: torch.zeros(t.shape) if t.group == "norms" else torch.randn(*t.shape, generator=g) * 0.02
               for t in model_tensors(arch)}
    save_file(tensors, out / "model.safetensors")
    (out / "qat.json").write_text(QATMetadata("int4-block", quantize_embeddings=True, steps=0).to_json())


def child(checkpoint: Path, output: Path) -> None:
    from gemma3_qat.exporters.gguf import export_gguf

    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    export_gguf(checkpoint, output, force=True, log=None)
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    print(json.dumps({"seconds": seconds, "baseline_mb": base, "peak_mb": peak}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gemma3-qat-bench-1b"))
    p.add_argument("--keep", action="store_true", help="keep the 4 GB checkpoint for the next run")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]))
        return
    ckpt, out = args.workdir / "checkpoint", args.workdir / "model-q4_0.gguf"
    if not (ckpt / "qat.json").exists():
        make_checkpoint(ckpt)
    size = (ckpt / "model.safetensors").stat().st_size
    r = json.loads(subprocess.run([sys.executable, __file__, "--child", str(ckpt), str(out)], capture_output=True,
                                  text=True, check=True).stdout.strip().splitlines()[-1])
    print("# Gemma 3 1B shape, random weights, int4-block + quantized embedding, fp32 latent checkpoint")
    print(f"checkpoint      {size / 1e9:.2f} GB")
    print(f"export          {r['seconds']:.1f} s  ->  {size / 1e6 / r['seconds']:.0f} MB/s of input (target >= 100)")
    print(f"peak RSS        {(r['peak_mb'] - r['baseline_mb']) / 1024:.2f} GB above the interpreter's "
          f"{r['baseline_mb'] / 1024:.2f} GB baseline (target <= 1.5)")
    print(f"GGUF            {out.stat().st_size / 1e9:.3f} GB ({out.stat().st_size / size:.3f} of the checkpoint)")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
