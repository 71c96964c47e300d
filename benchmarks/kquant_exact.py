"""Q4_K_M exactness at a released shape (random weights): our GGUF against llama.cpp's own tools, byte for byte.

    python benchmarks/kquant_exact.py [--shape 1b] [--workdir /tmp/gemma3-qat-kquant-1b] [--keep]

Writes a ``q4_k_m`` run directory as ``train`` does (fp32 latent weights, the mixture's lattice per tensor in
qat.json; Gaussian weights with a few heavy-tailed rows), exports it with ``export --to gguf``, and beside it runs
llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` + ``llama-quantize Q4_K_M`` (no imatrix) on the same
directory. Prints, per ggml type, the tensors and blocks llama.cpp's file shares with ours, and the seconds each
side took. Needs the tools ``scripts/build_llama_tools.sh`` builds. At 1B: ~4 GB of checkpoint, ~4 GB of F32 GGUF.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # builders.py, the byte comparison


def make_run(out: Path, shape: str) -> None:
    import torch
    from builders import build_tokenizer
    from safetensors.torch import save_file

    from gemma3_qat.checkpoint import QATMetadata
    from gemma3_qat.mixtures import mixture_lattices
    from gemma3_qat.models import GEMMA3_SHAPES, hf_config, model_tensors

    arch = GEMMA3_SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(arch)
    config.architectures = ["Gemma3ForCausalLM"]  # what train writes; llama.cpp's converter reads it
    config.save_pretrained(out)
    build_tokenizer(out)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for t in model_tensors(arch):
        if t.group == "norms":
            tensors[t.name] = torch.zeros(t.shape)
            continue
        w = torch.randn(*t.shape, generator=g) * 0.02
        rows = torch.randint(0, t.shape[0], (max(1, t.shape[0] // 64),), generator=g)
        w[rows] *= torch.distributions.StudentT(2.0).sample((len(rows), t.shape[1])).abs().clamp(max=50)
        tensors[t.name] = w
    save_file(tensors, out / "model.safetensors")
    lattices = mixture_lattices(arch, "q4_k_m")
    (out / "qat.json").write_text(QATMetadata("q4_k_m", quantize_embeddings=True, steps=0,
                                              lattices=lattices).to_json())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", help="a released shape (gemma3_qat.models.GEMMA3_SHAPES; default 1b)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gemma3-qat-kquant-1b"))
    p.add_argument("--keep", action="store_true", help="keep the run directory for the next run")
    args = p.parse_args()

    from gguf import GGUFReader
    from test_kquant_export import _byte_fractions

    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.models import GEMMA3_SHAPES
    from gemma3_qat.runtimes import llama_tools

    text_only = [k for k, a in GEMMA3_SHAPES.items() if a.vision is None]
    if args.shape not in text_only:
        p.error(f"--shape {args.shape}: one of the text-only shapes {', '.join(text_only)}")
    if not llama_tools.available():
        p.error("llama.cpp's tools are not built: run scripts/build_llama_tools.sh")
    run = args.workdir / "run"
    if not (run / "qat.json").exists():
        make_run(run, args.shape)
    t0 = time.perf_counter()
    ours_path = export_gguf(run, args.workdir / "ours-q4_k_m.gguf", force=True, log=None).path
    t1 = time.perf_counter()
    f32 = llama_tools.convert_hf(run, args.workdir / "latent-f32.gguf", outtype="f32")
    theirs_path = llama_tools.quantize(f32, args.workdir / "llama-q4_k_m.gguf", "Q4_K_M")
    t2 = time.perf_counter()
    f32.unlink()
    ours = {t.name: t for t in GGUFReader(ours_path).tensors}
    theirs = {t.name: t for t in GGUFReader(theirs_path).tensors}
    types_equal = {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    fractions = _byte_fractions(ours, theirs)
    print(f"# Gemma 3 {args.shape} shape, random weights (Gaussian, 1/64 of the rows Student-t), q4_k_m, no imatrix")
    print(f"export --to gguf {t1 - t0:.0f} s; convert_hf_to_gguf.py --outtype f32 + llama-quantize Q4_K_M "
          f"{t2 - t1:.0f} s")
    print(f"tensor types: {'every one equal' if types_equal else 'DIFFER'} ({len(ours)} tensors)")
    for k, (t, n, b, m) in sorted(fractions.items()):
        print(f"{k}: {t}/{n} tensors, {b}/{m} blocks byte for byte ({100 * b / m:.3f}%)")
    if not args.keep:
        shutil.rmtree(args.workdir)
    sys.exit(0 if types_equal and all(t == n for t, n, _, _ in fractions.values()) else 1)


if __name__ == "__main__":
    main()
