"""Quality: teacher vs post-training quantization vs QAT, every candidate exported and run in its runtime.

    python benchmarks/quality.py [--formats int4-block int4-channel sfp8 q4_k_m] [--steps N] [--workdir runs/quality]
    python benchmarks/quality.py --formats int4-block q4_k_m --plot docs/quality-frontier.png   # KL against file size
    python benchmarks/quality.py --model DIR --data FILE[:WEIGHT] ... [--eval-data FILE ...]   # another model

On the embedded default model and its data (or ``--model`` and its ``--data``: the same recipe, given only another
model and its data), with the default recipe (recipes/default.yaml), for each format:
PTQ (`train --steps 0`, round to nearest; and the recipe's imatrix-searched start where it has one) and QAT,
all exported to GGUF and evaluated in real llama.cpp against the PyTorch teacher on the shipped validation split
(sfp8 also as gemma.cpp's .sbs, run in real gemma.cpp); plus the torchao int4 group-32 grid as a baseline (QAT on
torchao's grid, then re-quantized to Q4_0 by llama.cpp's rule, which is what a torchao-QAT user shipping GGUF
gets). Prints one table (and --markdown for the README).

Beside them, the post-training files users actually download, made by llama.cpp's own tools
(``scripts/build_llama_tools.sh``; ``--no-ptq-baselines`` skips them): from an F32 GGUF of the teacher,
``llama-quantize`` RTN Q4_0, imatrix Q4_0, imatrix IQ4_NL, Q4_K_M, imatrix Q4_K_M (and Q8_0 for sfp8), the
importance matrix computed by ``llama-imatrix`` on the text of the very training rows QAT uses; the Q4_0-family
files with a Q8_0 embedding like ours, the K-quants with llama-quantize's own choice. Every row carries its bits
per weight (matmuls / whole file): users compare files of a size. ``recovered`` of a llama.cpp file is measured
against RTN Q4_0. Then one file is scored by ``llama-perplexity --kl-divergence`` too, beside our eval's number.
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
from gemma3_qat.evaluate import evaluate, set_recovered  # noqa: E402
from gemma3_qat.exporters.gemma_cpp import export_gemma_cpp  # noqa: E402
from gemma3_qat.exporters.gguf import export_gguf  # noqa: E402
from gemma3_qat.qat.train import TrainConfig, train  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
# (file name, llama-quantize type, imatrix-weighted, --token-embedding-type, the formats whose peer it is)
PTQ_FILES = (
    ("llama-q4_0.gguf", "Q4_0", False, "q8_0", ("int4-block", "int4-channel")),
    ("llama-imatrix-q4_0.gguf", "Q4_0", True, "q8_0", ("int4-block", "int4-channel")),
    ("llama-imatrix-iq4_nl.gguf", "IQ4_NL", True, "q8_0", ("int4-block", "int4-channel")),
    ("llama-q4_k_m.gguf", "Q4_K_M", False, None, ("int4-block", "int4-channel", "q4_k_m")),
    ("llama-imatrix-q4_k_m.gguf", "Q4_K_M", True, None, ("int4-block", "int4-channel", "q4_k_m")),
    ("llama-q8_0.gguf", "Q8_0", False, None, ("sfp8",)),
)
INT4_PEERS = {f[0] for f in PTQ_FILES if "int4-block" in f[4]}  # the files our Q4_0 rows stand against
RELEASE_FORMATS = ("int4-block", "int4-channel", "sfp8", "q4_k_m")  # the lattices q4_k ... are q4_k_m's parts
TEACHER_GGUF = "teacher-f32.gguf"  # llama.cpp's PTQ files are quantized from it, and llama-perplexity's base


def calibration_text(out: Path, source: dict | None = None) -> Path:
    """The text of the training rows QAT uses (the default recipe's data and split), for llama-imatrix."""
    from gemma3_qat.qat.data import setup_run_data

    data = setup_run_data(TrainConfig.from_recipe(RECIPE, **(source or {})), log=lambda *_: None)
    rows = data.tokenizer.batch_decode(data.train.input_ids.tolist(), skip_special_tokens=True)
    out.write_text("\n\n".join(r.strip() for r in rows if r.strip()), encoding="utf-8")
    return out


def build_ptq_baselines(workdir: Path, fmts: list[str], source: dict | None = None) -> list[Path]:
    """llama.cpp's own PTQ files of the teacher (``source``: the run's model and data; default the embedded ones;
    see the module docstring)."""
    from gemma3_qat.sources import resolve_model
    from gemma3_qat.runtimes import llama_tools

    wanted = [f for f in PTQ_FILES if set(f[4]) & set(fmts)]
    if not wanted:
        return []
    source = source or {}
    teacher = export_gguf(resolve_model(source.get("model")), workdir / TEACHER_GGUF, plain_type="f32", force=True,
                          log=None).path
    imatrix = None
    if any(f[2] for f in wanted):
        imatrix = llama_tools.imatrix(teacher, calibration_text(workdir / "calibration.txt", source),
                                      workdir / "imatrix.gguf")
    out = []
    for name, qtype, weighted, embedding, _ in wanted:
        out.append(llama_tools.quantize(teacher, workdir / name, qtype, imatrix_file=imatrix if weighted else None,
                                        embedding_type=embedding))
        print(f"built {name} (llama-quantize {qtype}{' --imatrix' if weighted else ''})", flush=True)
    return out


def llama_perplexity_check(workdir: Path, candidate: Path, ours: float, model: str | None,
                           eval_data: list[str] | None) -> str:
    """``llama-perplexity --kl-divergence`` of one file against the F32 teacher GGUF, on the text of the same
    evaluation windows, beside our eval's KL of that file."""
    from gemma3_qat.evaluate import evaluation_windows
    from gemma3_qat.sources import resolve_model
    from gemma3_qat.runtimes import llama_tools
    from gemma3_qat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(resolve_model(model)))
    windows, _, _ = evaluation_windows(tokenizer, data=eval_data, seq_len=256, max_windows=64)
    text = workdir / "eval-windows.txt"
    text.write_text("".join(tokenizer.batch_decode(windows.tolist(), skip_special_tokens=True)), encoding="utf-8")
    base = workdir / "teacher.kld"
    teacher = workdir / TEACHER_GGUF
    llama_tools.perplexity_kld(teacher, text, base, ctx=256, chunks=len(windows), save=True)
    printout = llama_tools.perplexity_kld(candidate, text, base, ctx=256, chunks=len(windows))
    import re

    found = re.search(r"Mean\s+KLD:\s*(\S+)", printout)  # as printed, nan included
    if found:
        mean = found.group(1)
    else:  # seen once (a run beside other jobs; not reproduced): say what llama.cpp printed instead
        lines = [line.strip() for line in printout.splitlines() if line.strip()]
        mean = f"not printed (its last line: {lines[-1] if lines else 'no output'!r})"
    return (f"# {candidate.name}: llama-perplexity --kl-divergence mean KLD {mean} (teacher = the F32 GGUF in "
            f"llama.cpp; it scores the second half of each 256-token chunk); our eval {ours:.5f} (teacher = PyTorch, "
            "every position of the same windows)")


def size_verdict(qat, ptq) -> str:
    """The issue's bar for files of a size: the QAT file's KL against each PTQ file of its size (matmul bits within
    2%: at most 0.6x theirs) and each up to 10% bigger (at most theirs)."""
    own = qat.bits[0]
    same = [p for p in ptq if p.bits and p.bits[0] <= own * 1.02]
    bigger = [p for p in ptq if p.bits and own * 1.02 < p.bits[0] <= own * 1.10]
    parts = []
    if same:
        worst = max(same, key=lambda p: qat.kl_mean / p.kl_mean)
        ratio = qat.kl_mean / worst.kl_mean
        parts.append(f"{ratio:.2f}x the KL of {worst.name} (the closest of {len(same)} PTQ files of its size, "
                     f"bar 0.6x: {'holds' if ratio <= 0.6 else 'MISSED'})")
    if bigger:
        beaten = [p.name for p in bigger if p.kl_mean < qat.kl_mean]
        parts.append(f"{len(bigger)} PTQ file{'s' * (len(bigger) > 1)} up to 10% bigger: "
                     + (f"MISSED, lower KL in {', '.join(beaten)}" if beaten else "none has less KL (holds)"))
    others = [f"{p.name} {p.bits[0]:.2f}" for p in ptq if p.bits and p.bits[0] > own * 1.10]
    if others:
        parts.append(f"beyond 10% bigger, not compared: {', '.join(others)} bits/weight")
    return f"# {qat.name} ({own:.2f} bits/weight): " + "; ".join(parts)


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
    from gemma3_qat.models import quantizable_linears
    from gemma3_qat.sources import load_gemma3

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


def plot_frontier(report, path: Path, workdir: Path) -> Path:
    """KL to the teacher against file size, one point per GGUF (log-scaled KL), llama.cpp's PTQ files, our PTQ
    starts and our QAT files apart, each group's lower envelope drawn: users choose by megabytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"llama.cpp PTQ": ("tab:gray", "o"), "ours, PTQ (step 0)": ("tab:blue", "s"), "ours, QAT": ("tab:red", "D")}
    points = {g: [] for g in groups}
    for r in report.results:
        if not r.name.endswith(".gguf") or r.bits is None:
            continue
        group = ("llama.cpp PTQ" if r.name.startswith("llama-") else
                 "ours, PTQ (step 0)" if r.name.startswith("ptq-") else "ours, QAT")
        mb = (workdir / r.name).stat().st_size / 1e6
        points[group].append((mb, r.kl_mean, r.name.removesuffix(".gguf")))
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ax.set_yscale("log")
    labels = []
    for g, pts in points.items():
        if not pts:
            continue
        color, marker = groups[g]
        pts.sort()
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, label=g, zorder=3)
        frontier, best = [], float("inf")
        for x, y, _ in pts:  # the lower envelope: the least KL at this size or less
            if y < best:
                frontier.append((x, y))
                best = y
        ax.plot([f[0] for f in frontier], [f[1] for f in frontier], c=color, lw=1, alpha=0.6, drawstyle="steps-post")
        labels += [(x, y, name, color) for x, y, name in pts]
    ax.autoscale_view()
    fig.tight_layout()  # the final axes box, so that points' positions below are where they are drawn
    # Files of one size and about one KL (a PTQ file of ours and llama-quantize's, byte for byte) would print their
    # names over each other: each label takes the first vertical offset whose box meets no label drawn before it.
    fontsize, placed = 6, []  # boxes in points: (x0, y0, x1, y1)
    to_points = 72 / fig.dpi
    for x, y, name, color in labels:
        px, py = (v * to_points for v in ax.transData.transform((x, y)))
        width, height = 0.55 * fontsize * len(name), fontsize + 1
        for dy in (3, -9, 12, -18, 21, -27, 30):
            box = (px + 4, py + dy, px + 4 + width, py + dy + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, dy), fontsize=fontsize, color=color)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("KL to the teacher (mean, llama.cpp)")
    ax.set_title(f"{Path(report.teacher).name}: {report.windows} x {report.seq_len} tokens of held-out text",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=list(RELEASE_FORMATS), choices=list(formats.FORMATS))
    p.add_argument("--steps", nargs="+", default=[], metavar="N|FORMAT=N",
                   help="QAT steps, for every format or per format (default: the recipe's)")
    p.add_argument("--keep", action="store_true",
                   help="keep --workdir and reuse the files already built there (a long run continued)")
    p.add_argument("--model", help="the teacher to quantize, as train --model (default: the embedded model)")
    p.add_argument("--data", nargs="+", metavar="FILE[:WEIGHT]",
                   help="its training data, as train --data (required with --model; default: the embedded samples)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE",
                   help="the evaluation text, as eval --data (default: the embedded model's held-out stdlib split, "
                        "held out for any model pretrain-default builds)")
    p.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw KL against file size (GGUF rows) into PNG")
    p.add_argument("--no-torchao", action="store_true")
    p.add_argument("--no-gemma-cpp", action="store_true", help="skip the sfp8 .sbs rows (no gemma.cpp binaries)")
    p.add_argument("--no-ptq-baselines", action="store_true",
                   help="skip llama.cpp's imatrix / K-quant files (no scripts/build_llama_tools.sh build)")
    args = p.parse_args()
    if args.model and not args.data:
        p.error("--model needs its --data (the recipe's data is the embedded model's)")
    source = {"model": args.model, "data": args.data}  # None = the recipe's (the embedded model and samples)
    quiet = lambda *_: None  # noqa: E731
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ggufs = []

    def run(name: str, **overrides) -> Path:
        cfg = TrainConfig.from_recipe(RECIPE, output=str(args.workdir / name), **source, **overrides)
        return train(cfg, force=True, log=quiet)

    per_format = dict(item.split("=", 1) for item in args.steps if "=" in item)
    every = [item for item in args.steps if "=" not in item]

    def steps_of(fmt: str) -> dict:
        n = per_format.get(fmt, every[0] if every else None)
        return {"steps": int(n)} if n is not None else {}

    steps = steps_of("int4-block")
    against = {}  # file -> the PTQ file its recovered fractions are measured against (beyond eval's own pairing)
    for fmt in args.formats:
        # PTQ is round-to-nearest under the runtime rule (llama-quantize's RTN Q4_0, tensor for tensor), whatever
        # the recipe starts QAT from; where the recipe starts from the imatrix search, that step 0 is a row too
        runs = [(f"ptq-{fmt}", {"steps": 0, "ptq_init": "rtn"})]
        if TrainConfig.from_recipe(RECIPE, format=fmt).ptq_init != "rtn":
            runs.append((f"ptq-imatrix-{fmt}", {"steps": 0}))
            against[f"ptq-imatrix-{fmt}.gguf"] = f"ptq-{fmt}.gguf"
        for name, kw in (*runs, (f"qat-{fmt}", steps_of(fmt))):
            if args.keep and (args.workdir / f"{name}.gguf").exists() and fmt != "sfp8":
                ggufs.append(args.workdir / f"{name}.gguf")
                print(f"kept {name}.gguf", flush=True)
                continue
            ckpt = run(name, format=fmt, **kw)
            ggufs.append(export_gguf(ckpt, args.workdir / f"{name}.gguf", force=True, log=None).path)
            print(f"built {ggufs[-1].name}", flush=True)
            if fmt == "sfp8" and not args.no_gemma_cpp:  # its own runtime, at 8 bits
                ggufs.append(export_gemma_cpp(ckpt, args.workdir / f"{name}.sbs", force=True, log=None).path)
                print(f"built {ggufs[-1].name}", flush=True)
    if not args.no_torchao and "int4-block" in args.formats:
        formats.FORMATS["torchao-int4-g32"] = TorchaoInt4G32()  # registered for this process only
        peer = TrainConfig.from_recipe(RECIPE, format="int4-block", **steps)  # the peer trains like int4-block
        # the recipe's per-format values name our formats only: the peer's lr and start are given (its own grid
        # has no Q4_0 rule to search on)
        ckpt = run("qat-torchao-int4-g32", format="torchao-int4-g32", lr=peer.lr, steps=peer.steps, ptq_init="rtn")
        plain = torchao_to_plain_checkpoint(ckpt, args.workdir / "torchao-plain")
        ggufs.append(export_gguf(plain, args.workdir / "qat-torchao-int4-g32-requantized-q4_0.gguf",
                                 plain_type="q4_0", force=True, log=None).path)
        print(f"built {ggufs[-1].name}", flush=True)
        against[ggufs[-1].name] = "ptq-int4-block.gguf"  # the same Q4_0 file format
    ptq = [] if args.no_ptq_baselines else build_ptq_baselines(args.workdir, args.formats, source)
    report = evaluate(ggufs + ptq, teacher=args.model, data=args.eval_data, max_windows=64, log=quiet)
    by_name = {r.name: r for r in report.results}
    rtn = by_name.get("llama-q4_0.gguf")
    if rtn is not None:  # llama.cpp's files against its RTN Q4_0
        against.update({name: rtn.name for name in INT4_PEERS - {rtn.name}})
    for r in report.results:
        if r.name.startswith("llama-"):
            r.format = "llama.cpp PTQ"
        elif "torchao" in r.name:  # a plain re-quantized GGUF records no QAT format or steps: name what it is
            r.format, r.steps = "torchao int4 g32 -> Q4_0", peer.steps
        if against.get(r.name) in by_name:
            set_recovered(r, by_name[against[r.name]], report.teacher_perplexity)
    print(f"# {report.windows} windows x {report.seq_len} tokens of {report.data}; teacher {report.teacher}; "
          "every .gguf is run in llama.cpp, every .sbs in gemma.cpp")
    print(report.table(markdown=args.markdown))
    best = min((r for r in report.results if r.name in INT4_PEERS),
               key=lambda r: r.kl_mean, default=None)
    for r in report.results:
        if best is not None and r.name.startswith("qat-int4"):
            vs_rtn = f"recovers {100 * (1 - r.kl_mean / rtn.kl_mean):.0f}% of llama.cpp RTN Q4_0's KL; " if rtn else ""
            print(f"# {r.name}: KL {r.kl_mean:.5f}: {vs_rtn}{100 * (1 - r.kl_mean / best.kl_mean):.0f}% below the "
                  f"best llama.cpp PTQ file ({best.name}, KL {best.kl_mean:.5f}, {best.bits[0]:.2f} bits/weight)")
            print(size_verdict(r, [p for p in report.results if p.name in INT4_PEERS]))
    k_m = by_name.get("qat-q4_k_m.gguf")
    for peer in ("llama-imatrix-q4_k_m.gguf", "llama-q4_k_m.gguf"):
        if k_m is not None and peer in by_name:
            print(f"# qat-q4_k_m.gguf: KL {k_m.kl_mean:.5f} = {k_m.kl_mean / by_name[peer].kl_mean:.2f}x {peer}'s "
                  f"({by_name[peer].kl_mean:.5f}; {k_m.bits[1]:.2f} vs {by_name[peer].bits[1]:.2f} bits/weight in all)")
    if args.plot:
        print(f"# plot: {plot_frontier(report, args.plot, args.workdir)}")
    if ptq:
        check = next((p for p in ptq if "imatrix-q4_k_m" in p.name), ptq[0])
        ours = next(r.kl_mean for r in report.results if r.name == check.name)
        print(llama_perplexity_check(args.workdir, check, ours, args.model, args.eval_data))


if __name__ == "__main__":
    main()
