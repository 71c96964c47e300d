"""Rerun the sweep that chose the default recipe: variants of recipes/default.yaml side by side, one table.

    python benchmarks/recipe_sweep.py                                  # the sweep behind the current recipe
    python benchmarks/recipe_sweep.py --set scale_grad=0,1,4 --format int4-block [--steps 400] [--seeds 0 1]
    python benchmarks/recipe_sweep.py --set lr=3e-5,5e-5,7e-5 --set batch_size=8,16 --jobs 2

Each variant is ``TrainConfig.from_recipe(recipes/default.yaml, format=..., **variant)`` trained on the embedded
model and data, each in its own process (``--jobs`` at once, the CPU threads split between them); the table shows
the final validation KL to the teacher on the training split's held-out rows (``val_kl``, what the recipe comments
quote), top-1 and perplexity, and the KL relative to the first variant. The quality benchmark
(``benchmarks/quality.py``) then measures the chosen recipe's exported files in llama.cpp.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
# the sweep behind the current default recipe's int4 settings (see the comments in recipes/default.yaml)
DEFAULT_SWEEP = ["scale_grad=0,1"]


def parse_value(text: str):
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
        axes.append([(key, parse_value(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def run_one(variant: dict, fmt: str, steps: int | None, seed: int, threads: int) -> dict:
    """One training run in a child process; returns its final validation metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(variant, format=fmt, seed=seed, output=str(Path(tmp) / "run"))
        if steps is not None:
            spec["steps"] = steps
        code = ("import json, sys\n"
                "from gemma3_qat.qat.train import TrainConfig, train\n"
                f"cfg = TrainConfig.from_recipe({str(RECIPE)!r}, **json.loads(sys.argv[1]))\n"
                "train(cfg, force=True, log=lambda *_: None)\n"
                "rows = [json.loads(l) for l in open(cfg.output + '/metrics.jsonl')]\n"
                "val = [r for r in rows if 'val_kl' in r]\n"
                "print('RESULT ' + json.dumps({'ptq': val[0], 'final': val[-1]}))\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-2000:]}")
        return json.loads(line[len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", dest="sets", help="KEY=V1,V2,... (repeat for a grid)")
    p.add_argument("--format", default="int4-block")
    p.add_argument("--steps", type=int, help="default: the recipe's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once (threads split between them)")
    args = p.parse_args()
    todo = [(v, s) for v in variants(args.sets or DEFAULT_SWEEP) for s in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda vs: run_one(vs[0], args.format, args.steps, vs[1], threads), todo))
    first = results[0]["final"]["val_kl"]
    print(f"# {args.format}, recipes/default.yaml{'' if args.steps is None else f' at {args.steps} steps'}: final "
          f"validation on the training split's held-out rows (PTQ KL {results[0]['ptq']['val_kl']:.5f})")
    print("| variant | seed | val KL | vs first | val top-1 | val ppl |")
    print("|---|---|---|---|---|---|")
    for (v, seed), r in zip(todo, results):
        f = r["final"]
        name = ", ".join(f"{k}={val}" for k, val in v.items()) or "recipe"
        print(f"| {name} | {seed} | {f['val_kl']:.5f} | {f['val_kl'] / first:.3f}x | {100 * f['val_top1']:.2f}% | "
              f"{f['val_ppl']:.3f} |")
    print(json.dumps([{"variant": v, "seed": s, **r} for (v, s), r in zip(todo, results)]), file=sys.stderr)


if __name__ == "__main__":
    main()
