"""More training text like the embedded sample data, for the data-lever sweep: excerpts of the running
interpreter's standard library, from the modules of the embedded model's training split only (its validation
modules, on which the quality table is measured, are never drawn).

    python benchmarks/stdlib_text.py --rows 12000 -o runs/data/stdlib-text-12k.jsonl

The embedded ``sample-text.jsonl`` is 1,500 such excerpts (seed 0, ~0.6M tokens: a 400-step run at batch 16 sees it
2.5 times); 12,000 (seed 1) are ~5M tokens, so a run sees each row about once.
"""

import argparse
import json
from pathlib import Path

from gemma3_qat.checkpoint import atomic_file
from gemma3_qat.embedded import corpus, samples


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=12000)
    p.add_argument("--chars", type=int, default=1500)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args()
    train, _ = corpus.split(corpus.stdlib_documents())
    with atomic_file(args.output, force=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in samples.text_samples(train, args.rows, chars=args.chars, seed=args.seed):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.output}: {args.rows} excerpts of {args.chars} characters from {len(train)} training-split "
          "files")


if __name__ == "__main__":
    main()
