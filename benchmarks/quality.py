"""Quality: teacher vs post-training quantization vs QAT, every candidate exported and run in its runtime.

    python benchmarks/quality.py [--formats int4-block int4-channel sfp8] [--steps N] [--workdir runs/quality]

On the embedded default model and its data, with the default recipe (recipes/default.yaml), for each format:
PTQ (`train --steps 0`) and QAT, both exported to GGUF and evaluated in real llama.cpp against the PyTorch
teacher on the shipped validation split (sfp8 also as gemma.cpp's .sbs, run in real gemma.cpp); plus the torchao int4 group-32 grid as a baseline (QAT on torchao's grid,
then re-quantized to Q4_0 by llama.cpp's rule, which is what a torchao-QAT user shipping GGUF gets). Prints one
table (and --markdown for the README).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # one table at the end, not a progress bar per run

import torch  # noqa: E402

from gemma3_qat import formats  # noqa: E402
from gemma3_qat.evaluate import evaluate  # noqa: E402
from gemma3_qat.exporters.gemma_cpp import export_gemma_cpp  # noqa: E402
from gemma3_qat.exporters.gguf import export_gguf  # noqa: E402
from gemma3_qat.qat.train import TrainConfig, train  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"


class TorchaoInt4G32(formats.WeightFormat):
    """torchao 0.18's int4 symmetric group-32 fake quantization (the peer's grid), for this benchmark only."""

    name = "torchao-int4-g32"

    def __init__(self):
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

        self._fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True))

    def fake_quantize_values(self, weight):
        with torch.no_grad():
            return self._fq(weight.detach().float())


def torchao_to_plain_checkpoint(run: Path, out: Path) -> Path:
    """The torchao-grid student's fake-quantized values as a plain fp32 checkpoint (what a torchao user exports)."""
    from gemma3_qat.models import load_gemma3, quantizable_linears

    model = load_gemma3(str(run), dtype=torch.float32)
    fmt = TorchaoInt4G32()
    with torch.no_grad():
        for linear in quantizable_linears(model).values():
            linear.weight.copy_(fmt.fake_quantize_values(linear.weight))
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    from gemma3_qat.checkpoint import copy_tokenizer_files

    copy_tokenizer_files(run, out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=list(formats.FORMATS))
    p.add_argument("--steps", type=int, help="QAT steps (default: the recipe's)")
    p.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--no-gemma-cpp", action="store_true", help="skip the sfp8 .sbs rows (no gemma.cpp binaries)")
    args = p.parse_args()
    quiet = lambda *_: None  # noqa: E731
    shutil.rmtree(args.workdir, ignore_errors=True)
    ggufs = []

    def run(name: str, **overrides) -> Path:
        cfg = TrainConfig.from_recipe(RECIPE, output=str(args.workdir / name), **overrides)
        return train(cfg, force=True, log=quiet)

    steps = {"steps": args.steps} if args.steps is not None else {}
    for fmt in args.formats:
        for name, kw in ((f"ptq-{fmt}", {"steps": 0}), (f"qat-{fmt}", steps)):
            ckpt = run(name, format=fmt, **kw)
            ggufs.append(export_gguf(ckpt, args.workdir / f"{name}.gguf", force=True, log=None).path)
            print(f"built {ggufs[-1].name}", flush=True)
            if fmt == "sfp8" and not args.no_gemma_cpp:  # its own runtime, at 8 bits
                ggufs.append(export_gemma_cpp(ckpt, args.workdir / f"{name}.sbs", force=True, log=None).path)
                print(f"built {ggufs[-1].name}", flush=True)
    if not args.no_torchao and "int4-block" in args.formats:
        formats.FORMATS["torchao-int4-g32"] = TorchaoInt4G32()  # registered for this process only
        peer = TrainConfig.from_recipe(RECIPE, format="int4-block", **steps)  # the peer trains like int4-block
        ckpt = run("qat-torchao-int4-g32", format="torchao-int4-g32", lr=peer.lr, steps=peer.steps)
        plain = torchao_to_plain_checkpoint(ckpt, args.workdir / "torchao-plain")
        ggufs.append(export_gguf(plain, args.workdir / "qat-torchao-int4-g32-requantized-q4_0.gguf",
                                 plain_type="q4_0", force=True, log=None).path)
        print(f"built {ggufs[-1].name}", flush=True)
    report = evaluate(ggufs, teacher=None, max_windows=64, log=quiet)
    # the torchao candidate's baseline is int4-block PTQ (the same Q4_0 file format)
    torchao = next((r for r in report.results if "torchao" in r.name), None)
    base = next((r for r in report.results if r.name == "ptq-int4-block.gguf"), None)
    if torchao and base:
        # a plain re-quantized GGUF records no QAT format or steps: name what it is
        torchao.format, torchao.steps = "torchao int4 g32 -> Q4_0", peer.steps
        torchao.baseline = base.name
        torchao.recovered_ppl = (base.perplexity - torchao.perplexity) / (base.perplexity - report.teacher_perplexity)
        torchao.recovered_kl = (base.kl_mean - torchao.kl_mean) / base.kl_mean
    print(f"# {report.windows} windows x {report.seq_len} tokens of {report.data}; teacher {report.teacher}; "
          "every .gguf is run in llama.cpp, every .sbs in gemma.cpp")
    print(report.table(markdown=args.markdown))


if __name__ == "__main__":
    main()
