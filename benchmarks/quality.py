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
import json
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
    # every matmul and the tied embedding Q4_0: the peers of an int4-block run that trains the embedding on the grid
    ("llama-q4_0-e4.gguf", "Q4_0", False, "q4_0", ("int4-block",)),
    ("llama-imatrix-q4_0-e4.gguf", "Q4_0", True, "q4_0", ("int4-block",)),
    ("llama-q4_k_m.gguf", "Q4_K_M", False, None, ("int4-block", "int4-channel", "q4_k_m")),
    ("llama-imatrix-q4_k_m.gguf", "Q4_K_M", True, None, ("int4-block", "int4-channel", "q4_k_m")),
    ("llama-q8_0.gguf", "Q8_0", False, None, ("sfp8",)),
)
INT4_PEERS = {f[0] for f in PTQ_FILES if "int4-block" in f[4]}  # the files our Q4_0 rows stand against
RELEASE_FORMATS = ("int4-block", "int4-channel", "sfp8", "q4_k_m")  # the lattices q4_k ... are q4_k_m's parts
TEACHER_GGUF = "teacher-f32.gguf"  # llama.cpp's PTQ files are quantized from it, and llama-perplexity's base


def calibration_text(out: Path, source: dict | None = None, recipe: Path = RECIPE) -> Path:
    """The text of the training rows QAT uses (the recipe's data and split), for llama-imatrix."""
    from gemma3_qat.qat.data import setup_run_data

    data = setup_run_data(TrainConfig.from_recipe(recipe, **(source or {})), log=lambda *_: None)
    rows = data.tokenizer.batch_decode(data.train.input_ids.tolist(), skip_special_tokens=True)
    out.write_text("\n\n".join(r.strip() for r in rows if r.strip()), encoding="utf-8")
    return out


def trains_embedding_on_grid(recipe: Path) -> bool:
    """Whether the recipe's int4-block run quantizes the tied embedding (its llama.cpp peers are then ``-e4``)."""
    return TrainConfig.from_recipe(recipe, format="int4-block").quantize_embeddings


def wanted_ptq_files(fmts: list[str], recipe: Path, names: list[str] | None = None) -> list[tuple]:
    """The llama.cpp files to build: ``names`` (``--ptq``), else every peer of ``fmts``, the all-Q4_0 (``-e4``)
    ones only where the recipe trains int4-block's embedding on the grid."""
    if names is not None:
        return [f for f in PTQ_FILES if f[0].removesuffix(".gguf") in names]
    e4 = "int4-block" in fmts and trains_embedding_on_grid(recipe)
    return [f for f in PTQ_FILES if set(f[4]) & set(fmts) and (e4 or not f[0].endswith("-e4.gguf"))]


def build_ptq_baselines(workdir: Path, wanted: list[tuple], source: dict | None = None,
                        recipe: Path = RECIPE, imatrix_chunks: int | None = None) -> list[Path]:
    """llama.cpp's own PTQ files of the teacher (``source``: the run's model and data; default the embedded ones;
    see the module docstring)."""
    from gemma3_qat.sources import resolve_model
    from gemma3_qat.runtimes import llama_tools

    if not wanted:
        return []
    source = source or {}
    teacher = export_gguf(resolve_model(source.get("model")), workdir / TEACHER_GGUF, plain_type="f32", force=True,
                          log=None).path
    imatrix = None
    if any(f[2] for f in wanted):
        imatrix = llama_tools.imatrix(teacher, calibration_text(workdir / "calibration.txt", source, recipe),
                                      workdir / "imatrix.gguf", chunks=imatrix_chunks)
    out = []
    for name, qtype, weighted, embedding, _ in wanted:
        out.append(llama_tools.quantize(teacher, workdir / name, qtype, imatrix_file=imatrix if weighted else None,
                                        embedding_type=embedding))
        print(f"built {name} (llama-quantize {qtype}{' --imatrix' if weighted else ''})", flush=True)
    return out


def llama_perplexity_klds(workdir: Path, files: list[Path], model: str | None, eval_data: list[str] | None, *,
                          seq_len: int = 256, windows: int = 64) -> dict[str, tuple[str, str]]:
    """``llama-perplexity --kl-divergence`` of each file against the F32 teacher GGUF, on the text of the same
    evaluation windows: {file name: (mean KLD, same top-1 %)} as llama.cpp prints them (nan included; ``not
    printed (...)`` with its last line where it printed none)."""
    import re

    from gemma3_qat.evaluate import evaluation_windows
    from gemma3_qat.sources import resolve_model
    from gemma3_qat.runtimes import llama_tools
    from gemma3_qat.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(resolve_model(model)))
    ids, _, _ = evaluation_windows(tokenizer, data=eval_data, seq_len=seq_len, max_windows=windows)
    text = workdir / "eval-windows.txt"
    text.write_text("".join(tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)), encoding="utf-8")
    base = workdir / "teacher.kld"
    llama_tools.perplexity_kld(workdir / TEACHER_GGUF, text, base, ctx=seq_len, chunks=len(ids), save=True)
    out = {}
    for f in files:
        printout = llama_tools.perplexity_kld(f, text, base, ctx=seq_len, chunks=len(ids))
        kld, top = re.search(r"Mean\s+KLD:\s*(\S+)", printout), re.search(r"Same top p:\s*(\S+)", printout)
        if kld is None:
            lines = [line.strip() for line in printout.splitlines() if line.strip()]
            out[f.name] = (f"not printed (its last line: {lines[-1] if lines else 'no output'!r})", "")
        else:
            out[f.name] = (kld.group(1), top.group(1) if top else "")
    return out


def llama_perplexity_check(workdir: Path, candidate: Path, ours: float, model: str | None,
                           eval_data: list[str] | None, seq_len: int = 256, windows: int = 64) -> str:
    """One file's ``llama-perplexity --kl-divergence`` beside our eval's KL of it."""
    mean, _ = llama_perplexity_klds(workdir, [candidate], model, eval_data, seq_len=seq_len,
                                    windows=windows)[candidate.name]
    return (f"# {candidate.name}: llama-perplexity --kl-divergence mean KLD {mean} (teacher = the F32 GGUF in "
            f"llama.cpp; it scores the second half of each {seq_len}-token chunk); our eval {ours:.5f} (teacher = "
            "PyTorch, every position of the same windows)")


def size_verdict(qat, ptq) -> str:
    """The bar for files of a size: the QAT file's KL against each PTQ file of its size (whole-file bits per weight
    within 2%: at most 0.6x theirs) and each up to 10% bigger (at most theirs). Whole-file bits, not the matmuls':
    at 270M the embedding is most of the file, and a Q8_0 embedding makes a file half as big again."""
    own = qat.bits[1]
    same = [p for p in ptq if p.bits and p.bits[1] <= own * 1.02]
    bigger = [p for p in ptq if p.bits and own * 1.02 < p.bits[1] <= own * 1.10]
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
    others = [f"{p.name} {p.bits[1]:.2f}" for p in ptq if p.bits and p.bits[1] > own * 1.10]
    if others:
        parts.append(f"beyond 10% bigger, not compared: {', '.join(others)} bits/weight")
    return f"# {qat.name} ({own:.2f} bits/weight in all): " + "; ".join(parts)


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


def plot_frontier(report, path: Path, workdir: Path, title: str | None = None) -> Path:
    """KL to the teacher against file size, one point per GGUF (log-scaled KL), llama.cpp's PTQ files, our PTQ
    starts and our QAT files apart, each group's lower envelope drawn: users choose by megabytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"llama.cpp PTQ": ("tab:gray", "o"), "ours, PTQ (step 0)": ("tab:blue", "s"),
              "ours, QAT": ("tab:red", "D")}
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
    ax.set_title(f"{title or Path(report.teacher).name}: {report.windows} x {report.seq_len} tokens of held-out text",
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
    p.add_argument("--recipe", default=str(RECIPE),
                   help="the recipe of every run, a file or a shipped name (default: recipes/default.yaml)")
    p.add_argument("--data", nargs="+", metavar="FILE[:WEIGHT]",
                   help="its training data, as train --data (required with --model; default: the embedded samples)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE",
                   help="the evaluation text, as eval --data (default: the embedded model's held-out stdlib split, "
                        "held out for any model pretrain-default builds)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation window (default 256)")
    p.add_argument("--ptq", nargs="+", metavar="NAME", choices=[f[0].removesuffix(".gguf") for f in PTQ_FILES],
                   help="the llama.cpp files to build (default: every peer of --formats). A teacher that is itself "
                        "a llama.cpp file: leave out the files of its own lattices (round trips, not baselines)")
    p.add_argument("--imatrix-chunks", type=int, metavar="N",
                   help="llama-imatrix reads the first N chunks of 256 tokens of the training text (default: all of "
                        "it; at 270M and up, all of the embedded text takes over an hour on 2 cores)")
    p.add_argument("--llama-kld", action="store_true",
                   help="score every .gguf by llama-perplexity --kl-divergence too (teacher: the F32 GGUF)")
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
    from gemma3_qat.errors import Gemma3QATError
    from gemma3_qat.qat.recipes import recipe_path

    try:
        recipe = recipe_path(args.recipe)
    except Gemma3QATError as e:
        p.error(str(e))
    quiet = lambda *_: None  # noqa: E731
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ggufs = []

    def run(name: str, **overrides) -> Path:
        cfg = TrainConfig.from_recipe(recipe, output=str(args.workdir / name), **source, **overrides)
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
        if TrainConfig.from_recipe(recipe, format=fmt).ptq_init != "rtn":
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
        peer = TrainConfig.from_recipe(recipe, format="int4-block", **steps)  # the peer trains like int4-block
        # the recipe's per-format values name our formats only: the peer's lr and start are given (its own grid
        # has no Q4_0 rule to search on)
        ckpt = run("qat-torchao-int4-g32", format="torchao-int4-g32", lr=peer.lr, steps=peer.steps, ptq_init="rtn")
        plain = torchao_to_plain_checkpoint(ckpt, args.workdir / "torchao-plain")
        ggufs.append(export_gguf(plain, args.workdir / "qat-torchao-int4-g32-requantized-q4_0.gguf",
                                 plain_type="q4_0", force=True, log=None).path)
        print(f"built {ggufs[-1].name}", flush=True)
        against[ggufs[-1].name] = "ptq-int4-block.gguf"  # the same Q4_0 file format
    ptq = [] if args.no_ptq_baselines else build_ptq_baselines(
        args.workdir, wanted_ptq_files(args.formats, recipe, args.ptq), source, recipe, args.imatrix_chunks)
    report = evaluate(ggufs + ptq, teacher=args.model, data=args.eval_data, seq_len=args.seq_len,
                      max_windows=args.windows, log=quiet)
    by_name = {r.name: r for r in report.results}
    rtn_e4 = by_name.get("llama-q4_0-e4.gguf")
    for base in ("llama-q4_0.gguf", "llama-q4_0-e4.gguf"):  # llama.cpp's files against its RTN Q4_0, embedding alike
        if base in by_name:
            alike = {n for n in INT4_PEERS - {base} if n.endswith("-e4.gguf") == base.endswith("-e4.gguf")}
            against.update(dict.fromkeys(alike, base))
    # our int4-block QAT file against the RTN file whose embedding is like its own (Q4_0 where the recipe trains it)
    rtn = rtn_e4 if rtn_e4 is not None and trains_embedding_on_grid(recipe) else by_name.get("llama-q4_0.gguf")
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
            what = "llama.cpp RTN Q4_0's KL" + (" (the embedding Q4_0 too)" if rtn is rtn_e4 else "")
            vs_rtn = f"recovers {100 * (1 - r.kl_mean / rtn.kl_mean):.0f}% of {what}; " if rtn else ""
            vs_best = (f"{100 * (1 - r.kl_mean / best.kl_mean):.0f}% below" if r.kl_mean <= best.kl_mean else
                       f"{r.kl_mean / best.kl_mean:.2f}x the KL of")
            print(f"# {r.name}: KL {r.kl_mean:.5f}: {vs_rtn}{vs_best} the best llama.cpp PTQ file ({best.name}, KL "
                  f"{best.kl_mean:.5f}, {best.bits[0]:.2f} bits/weight)")
            print(size_verdict(r, [p for p in report.results if p.name in INT4_PEERS]))
    k_m = by_name.get("qat-q4_k_m.gguf")
    for peer in ("llama-imatrix-q4_k_m.gguf", "llama-q4_k_m.gguf"):
        if k_m is not None and peer in by_name:
            print(f"# qat-q4_k_m.gguf: KL {k_m.kl_mean:.5f} = {k_m.kl_mean / by_name[peer].kl_mean:.2f}x {peer}'s "
                  f"({by_name[peer].kl_mean:.5f}; {k_m.bits[1]:.2f} vs {by_name[peer].bits[1]:.2f} bits/weight in all)")
    for fmt in args.formats:  # KL against steps, on the training data's held-out rows (the run's own validation)
        rows = [json.loads(line) for line in (args.workdir / f"qat-{fmt}" / "metrics.jsonl").read_text().splitlines()]
        curve = ", ".join(f"{r['step']}: {r['val_kl']:.5f}" for r in rows if r.get("val_kl") is not None)
        print(f"# qat-{fmt} validation KL by step (training domain, PyTorch student): {curve}")
    if args.plot:
        title = Path(args.model).name.removesuffix(".gguf") if args.model else None
        print(f"# plot: {plot_frontier(report, args.plot, args.workdir, title)}")
    if args.llama_kld and (files := [g for g in ggufs + ptq if g.suffix == ".gguf"]):
        klds = llama_perplexity_klds(args.workdir, files, args.model, args.eval_data, seq_len=args.seq_len,
                                     windows=args.windows)
        print(f"\n# llama-perplexity --kl-divergence against the F32 teacher GGUF ({report.windows} chunks of "
              f"{args.seq_len} tokens, the second half of each scored)")
        print("| file | MB | mean KLD | same top-1 |\n|---|---|---|---|")
        for f in files:
            print(f"| {f.name} | {f.stat().st_size / 1e6:.1f} | {klds[f.name][0]} | {klds[f.name][1]}% |")
    elif ptq:
        check = next((p for p in ptq if "imatrix-q4_k_m" in p.name), ptq[0])
        ours = next(r.kl_mean for r in report.results if r.name == check.name)
        print(llama_perplexity_check(args.workdir, check, ours, args.model, args.eval_data, args.seq_len,
                                     args.windows))


if __name__ == "__main__":
    main()
