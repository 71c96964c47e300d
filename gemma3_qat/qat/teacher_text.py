"""Training text sampled from the teacher itself: distillation data that is on the teacher's own distribution.

    gemma3-qat sample-data --rows 8192 -o teacher-text.jsonl            # the embedded model; or --model X
    gemma3-qat train --format int4-block --data teacher-text.jsonl:0.5 --data mine.jsonl:0.5

Why: QAT by distillation learns to match the teacher where it is shown the teacher. On a checkpoint's own training
text the teacher is confident (it has seen it), so a student trained there learns little about the text it will
meet in use, where the teacher is less sure; text the teacher samples at temperature 1 has the teacher's own
uncertainty (LLM-QAT, Liu et al. 2023, trains on such data alone). On the embedded model the validation KL of the
unquantized-vs-Q4_0 pair is 0.0081 on held-out rows of its training text but 0.0149 on teacher samples, close to
the 0.0141 measured on held-out modules in llama.cpp (docs/results.md).

Each row starts from BOS and is sampled token by token (no top-k / top-p: the full distribution), ``tokens`` long
with BOS, EOS and padding never sampled (``train`` adds BOS and EOS itself). Rows are written as ``{"text": ...}``
JSON lines, the format ``train --data`` reads, decoded with special tokens kept (chat markers the teacher produces
re-tokenize to the same specials). The output is written to a temporary file and renamed.
Rows are reproducible for a seed on one machine (each batch seeds its own sampling); across machines and thread
counts float reductions may differ and so may the samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gemma3_qat.errors import InputError


def _check_arguments(rows: int, tokens: int, batch_size: int, temperature: float) -> None:
    if rows < 1 or tokens < 1 or batch_size < 1:
        raise InputError("--rows, --tokens and --batch-size must be positive")
    if temperature <= 0:
        raise InputError(f"--temperature {temperature} must be positive (1 samples the teacher as it is)")


def sample_texts(model, tokenizer, rows: int, tokens: int, *, seed: int = 0, temperature: float = 1.0,
                 batch_size: int = 64, progress: bool = True) -> list[str]:
    """``rows`` texts of ``tokens`` tokens sampled from ``model`` (a causal LM in eval mode), batch by batch."""
    from tqdm.auto import tqdm

    _check_arguments(rows, tokens, batch_size, temperature)
    from gemma3_qat.models import architecture_from_config

    context = architecture_from_config(model.config, "model", "the loaded model").context
    if tokens + 1 > context:
        raise InputError(f"--tokens {tokens} is beyond the model's context of {context} tokens")
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    # never sampled (their logits masked, the rest renormalised): train adds BOS/EOS itself, padding is not text
    suppress = sorted({i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                       if i is not None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    bar = tqdm(total=rows, disable=not progress, desc="sampling the teacher", unit="row")
    for b, start in enumerate(range(0, rows, batch_size)):
        n = min(batch_size, rows - start)
        with torch.random.fork_rng(), torch.no_grad():  # the caller's RNG state is left as it was
            torch.manual_seed(seed * 1_000_003 + b)
            ids = model.generate(torch.full((n, 1), bos, device=device), do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
                                 pad_token_id=pad, suppress_tokens=suppress)
        out.extend(tokenizer.decode(row, skip_special_tokens=False) for row in ids[:, 1:].tolist())
        bar.update(n)
    bar.close()
    return out


def write_teacher_text(output: str | Path, *, model: str | None = None, rows: int = 8192, tokens: int = 255,
                       seed: int = 0, temperature: float = 1.0, batch_size: int = 64, force: bool = False,
                       progress: bool = True, log=print) -> Path:
    """``gemma3-qat sample-data``: sample the unquantized ``model`` (default: the embedded model) and write the
    rows as JSON lines to ``output``, atomically (an existing file is kept unless ``force``)."""
    from gemma3_qat.checkpoint import atomic_file, check_output
    from gemma3_qat.sources import local_tokenizer_dir
    from gemma3_qat.sources import resolve_model
    from gemma3_qat.qat.distill import load_teacher
    from gemma3_qat.tokenizer import load_tokenizer

    output = Path(output)
    _check_arguments(rows, tokens, batch_size, temperature)  # before loading the model
    check_output(output, force=force)  # before minutes of sampling, not after
    source = resolve_model(model)
    tokenizer = load_tokenizer(local_tokenizer_dir(source))
    teacher = load_teacher(source)  # its placement: the CPU, or spread over the visible GPUs
    texts = sample_texts(teacher, tokenizer, rows, tokens, seed=seed, temperature=temperature,
                         batch_size=batch_size, progress=progress)
    with atomic_file(output, force=force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    log(f"wrote {output}: {rows} rows of {tokens} tokens sampled from {source} (temperature {temperature:g}, "
        f"seed {seed})")
    return output
