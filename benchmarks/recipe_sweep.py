"""Rerun the sweep that chose the default recipe: variants of recipes/default.yaml side by side, one table.

    python benchmarks/recipe_sweep.py                                  # the sweep behind the current recipe
    python benchmarks/recipe_sweep.py --set scale_grad=0,1,4 --format int4-block [--steps 400] [--seeds 0 1]
    python benchmarks/recipe_sweep.py --set lr=3e-5,5e-5,7e-5 --set batch_size=8,16 --jobs 2
    python benchmarks/recipe_sweep.py --set data=default,teacher.jsonl,teacher.jsonl:0.5+text.jsonl:0.5 --llama

``data`` values are ``default`` (the embedded sample data) or ``FILE[:WEIGHT]`` sources joined by ``+``.
``--model DIR --data FILE[:WEIGHT] ...`` sweeps another model (e.g. the second model of
``benchmarks/second-model-pretrain.yaml``) with its data. ``--llama`` also exports each run to GGUF and measures it in
llama.cpp on the embedded model's held-out modules (the 64 windows of the quality table), and the run's fake-quant
student in PyTorch on the same windows, both against the fp32 teacher (``val_kl`` is measured on held-out rows of the
training data, against the run's own teacher: in bf16 under ``--set mixed_precision=bf16``).

Each variant is ``TrainConfig.from_recipe(recipes/default.yaml, format=..., **variant)`` trained on the embedded
model and data (or ``--model``'s), each in its own process (``--jobs`` at once, the CPU threads split between
them); the table shows the final validation KL to the teacher on the training split's held-out rows (``val_kl``, what
docs/results.md quotes), top-1 and perplexity, and the KL relative to the first variant. Each run keeps its
directory under ``--workdir`` (its ``metrics.jsonl`` can be watched while it trains), and each variant's line, with
its validation-KL curve, is printed as soon as it finishes. The quality benchmark (``benchmarks/quality.py``) then
measures the chosen recipe's exported files in llama.cpp.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
# the sweep behind the current default recipe's int4 settings (see the comments in recipes/default.yaml)
DEFAULT_SWEEP = ["ptq_init=rtn,imatrix"]


def parse_value(text: str, key: str = ""):
    if key == "data":  # a list of sources; "default" = the embedded sample data
        return [] if text == "default" else text.split("+")
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def variants(sets: list[str]) -> list[dict]:
    axes = []
    for s in sets:
        key, _, values = s.partition("=")
        if not values:
            raise SystemExit(f"--set {s!r}: expected KEY=V1,V2,...")
        axes.append([(key, parse_value(v, key)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def _show(value) -> str:
    if isinstance(value, list):
        return "+".join(Path(v).name for v in value) or "default"
    return str(value)


def run_name(variant: dict, seed: int) -> str:
    return ("-".join(f"{k}={_show(v)}" for k, v in variant.items()) or "recipe") + f"-seed{seed}"


def llama_kl(run: Path, threads: int, windows: int = 64, teacher: str | None = None) -> tuple[float, float]:
    """(the run exported to GGUF and measured in llama.cpp, the run's fake-quant student in PyTorch): KL to the fp32
    teacher on the embedded validation split, one ``gemma3-qat eval`` of both (the same windows, one teacher)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    cli = [sys.executable, "-m", "gemma3_qat.cli"]
    gguf = run.parent / f"{run.name}.gguf"  # not with_suffix: run names hold dots (lr=3.5e-05, x.jsonl:0.5)
    subprocess.run(cli + ["export", str(run), "--to", "gguf", "-o", str(gguf), "--force"], check=True, env=env,
                   capture_output=True)
    out = subprocess.run(cli + ["eval", str(run), str(gguf), "--max-windows", str(windows), "--json"]
                         + (["--teacher", teacher] if teacher else []), check=True, env=env,
                         capture_output=True, text=True).stdout
    kl = {r["name"]: r["kl_mean"] for r in json.loads(out[out.index("{"):])["results"]}
    return kl[gguf.name], kl[run.name]


def run_one(variant: dict, fmt: str, steps: int | None, seed: int, threads: int, workdir: Path,
            llama: bool = False, source: dict | None = None) -> dict:
    """One training run in a child process (its run directory under ``workdir``); returns its validation rows."""
    out = workdir / run_name(variant, seed)
    shutil.rmtree(out, ignore_errors=True)
    source = source or {}
    spec = dict(source, **variant, format=fmt, seed=seed, output=str(out))
    if steps is not None:
        spec["steps"] = steps
    code = ("import json, sys\n"
            "from gemma3_qat.qat.train import TrainConfig, train\n"
            f"cfg = TrainConfig.from_recipe({str(RECIPE)!r}, **json.loads(sys.argv[1]))\n"
            "train(cfg, force=True, log=lambda *_: None)\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    with open(workdir / f"{out.name}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode:
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode}); see {workdir / (out.name + '.log')}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    kl, torch_kl = llama_kl(out, threads, teacher=source.get("model")) if llama else (None, None)
    return {"val": [r for r in rows if "val_kl" in r], "llama_kl": kl, "pytorch_kl": torch_kl}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", dest="sets", help="KEY=V1,V2,... (repeat for a grid)")
    p.add_argument("--format", default="int4-block")
    p.add_argument("--steps", type=int, help="default: the recipe's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1,
                   help="variants trained at once (threads split between them; on 2 cores two 1-thread runs took "
                        "~5.5 s/step each, where one run alone took ~2.1 s/step in an earlier session (not side by "
                        "side): likely keep 1 there)")
    p.add_argument("--model", help="another teacher, as train --model (default: the embedded model)")
    p.add_argument("--data", nargs="+", metavar="FILE[:WEIGHT]", help="its training data (required with --model)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: the cores split between the jobs)")
    p.add_argument("--workdir", type=Path, default=Path("runs/sweep"), help="where the runs are kept")
    p.add_argument("--llama", action="store_true",
                   help="also export each run and measure its KL in llama.cpp on the held-out modules (64 windows)")
    args = p.parse_args()
    if args.model and not args.data:
        p.error("--model needs its --data (the recipe's data is the embedded model's)")
    source = {"model": args.model, "data": args.data} if args.model else {}
    args.workdir.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for v in variants(args.sets or DEFAULT_SWEEP) for s in args.seeds]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    from concurrent.futures import ThreadPoolExecutor, as_completed

    at = "" if args.steps is None else f" at {args.steps} steps"
    model = f", {args.model}" if args.model else ""
    print(f"# {args.format}{model}, recipes/default.yaml{at}; {len(todo)} runs in {args.workdir} ({args.jobs} at once)",
          flush=True)
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, v, args.format, args.steps, s, threads, args.workdir,
                               args.llama, source): (i, v, s)
                   for i, (v, s) in enumerate(todo)}
        for fut in as_completed(futures):
            i, v, seed = futures[fut]
            results[i] = r = fut.result()
            curve = " ".join(f"{row['step']}:{row['val_kl']:.5f}" for row in r["val"])
            print(f"done {run_name(v, seed)}: val KL by step {curve}", flush=True)
    results = [results[i] for i in range(len(todo))]
    first = results[0]["val"][-1]["val_kl"]
    print(f"# final validation on the training split's held-out rows (PTQ KL {results[0]['val'][0]['val_kl']:.5f})")
    if any("data" in v for v, _ in todo):
        print("# val KL is measured on each variant's own data: across data variants compare the llama.cpp column"
              + ("" if args.llama else " (--llama)"))
    print("| variant | seed | val KL | vs first | val top-1 | val ppl |"
          + (" PyTorch KL | vs first | llama.cpp KL | vs first |" * args.llama))
    print("|---|---|---|---|---|---|" + "---|---|---|---|" * args.llama)
    for (v, seed), r in zip(todo, results):
        f = r["val"][-1]
        name = ", ".join(f"{k}={_show(val)}" for k, val in v.items()) or "recipe"
        line = (f"| {name} | {seed} | {f['val_kl']:.5f} | {f['val_kl'] / first:.3f}x | {100 * f['val_top1']:.2f}% | "
                f"{f['val_ppl']:.3f} |")
        if args.llama:
            line += (f" {r['pytorch_kl']:.5f} | {r['pytorch_kl'] / results[0]['pytorch_kl']:.3f}x | "
                     f"{r['llama_kl']:.5f} | {r['llama_kl'] / results[0]['llama_kl']:.3f}x |")
        print(line)


if __name__ == "__main__":
    main()
