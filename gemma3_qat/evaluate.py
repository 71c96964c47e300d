"""Evaluate candidates against the teacher: PyTorch checkpoints (fake quantization applied from ``qat.json``) and
GGUF files run in real llama.cpp (through llama-cpp-python), so the number users see is the one of the file they
ship.

Per candidate, on held-out windows: perplexity, mean and p99 per-token KL(teacher || candidate), top-1 agreement
with the teacher; with a post-training-quantization baseline, the fraction of its degradation that QAT recovers,
``(m_PTQ - m_QAT) / (m_PTQ - m_teacher)`` for perplexity and for KL (the teacher's KL is 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from gemma3_qat.errors import InputError, MissingFileError


class EvalError(InputError):
    """A candidate that cannot be compared with the reference (other tokenizer, missing file, ...)."""


@dataclass
class Result:
    name: str
    backend: str  # "pytorch" or "llama.cpp"
    format: str
    steps: int | None
    perplexity: float
    kl_mean: float
    kl_p99: float
    top1: float
    tokens: int
    recovered_ppl: float | None = None
    recovered_kl: float | None = None
    baseline: str | None = None


@dataclass
class EvalReport:
    teacher: str
    data: str
    windows: int
    seq_len: int
    teacher_perplexity: float
    results: list[Result] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self, markdown: bool = False) -> str:
        head = ["candidate", "backend", "format", "steps", "ppl", "KL mean", "KL p99", "top-1", "recovered ppl",
                "recovered KL"]
        rows = [["teacher", "pytorch", "-", "-", f"{self.teacher_perplexity:.3f}", "0", "0", "100.0%", "", ""]]
        for r in self.results:
            pct = lambda x: "" if x is None else f"{100 * x:.0f}%"  # noqa: E731
            rows.append([r.name, r.backend, r.format, "-" if r.steps is None else str(r.steps), f"{r.perplexity:.3f}",
                         f"{r.kl_mean:.5f}", f"{r.kl_p99:.4f}", f"{100 * r.top1:.1f}%", pct(r.recovered_ppl),
                         pct(r.recovered_kl)])
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            return "\n".join(lines)
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows])


# ------------------------------------------------------------------------------------------------- data


def evaluation_windows(tokenizer, *, data: list[str] | None = None, seq_len: int = 256,
                       max_windows: int = 32) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Packed windows ``[N, seq_len]`` and labels (-100 at document starts) of the evaluation text.

    Default: the validation split of the embedded model's corpus, shipped with the package.
    """
    from gemma3_qat.qat.data import DataSource, load_documents, pack, tokenize_documents

    if data:
        docs = []
        for spec in data:
            docs.extend(tokenize_documents(load_documents(DataSource.parse(spec)), tokenizer))
        name = ", ".join(data)
    else:
        from gemma3_qat.assets import validation_documents

        texts = [d["text"] for d in validation_documents()]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        docs = [{"input_ids": [bos, *ids, eos], "loss_mask": [1] * (len(ids) + 2)}
                for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        name = "embedded validation split (Python standard library)"
    ids, labels = pack(docs, seq_len, tokenizer.pad_token_id or 0)
    if len(ids) > 1:  # the last window may be mostly padding
        ids, labels = ids[:-1], labels[:-1]
    return ids[:max_windows], labels[:max_windows], name


# ------------------------------------------------------------------------------------------------- backends


def pytorch_logits(checkpoint: str | Path, windows: torch.Tensor, batch: int = 8) -> Iterator[torch.Tensor]:
    """Logits per window of a checkpoint, with fake quantization from its ``qat.json`` if it has one."""
    from gemma3_qat.checkpoint import QAT_JSON, QATMetadata
    from gemma3_qat.models import load_gemma3
    from gemma3_qat.qat.prepare import prepare

    model = load_gemma3(str(checkpoint), dtype=torch.float32).eval()
    qat_json = Path(checkpoint) / QAT_JSON
    if qat_json.exists():
        meta = QATMetadata.read(qat_json)
        prepare(model, meta.format, quantize_embeddings=meta.quantize_embeddings)
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            yield from model(input_ids=windows[i:i + batch]).logits.float()


class LlamaCppModel:
    """A GGUF file in real llama.cpp: per-position logits of token windows."""

    def __init__(self, path: str | Path, n_ctx: int, **kwargs):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise EvalError("evaluating GGUF files needs llama-cpp-python: `pip install llama-cpp-python` "
                            "(see the README for the portable build)") from None
        if not Path(path).exists():
            raise MissingFileError(f"{path} does not exist")
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                         verbose=False, **kwargs)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


TOKENIZER_PROBE = ("<start_of_turn>user\ndef f(x):\n    return x ** 2  # squares\t\n\n<end_of_turn>\n"
                   "<start_of_turn>model\n12345 67.8 é ü 中文 日本語  x   y\n<end_of_turn>")


def llama_cpp_logits(path: str | Path, windows: torch.Tensor, tokenizer) -> Iterator[torch.Tensor]:
    with LlamaCppModel(path, n_ctx=windows.shape[1]) as model:
        ours = tokenizer(TOKENIZER_PROBE).input_ids
        theirs = model.tokenize(TOKENIZER_PROBE)
        if ours != theirs:
            raise EvalError(f"{Path(path).name}: its tokenizer differs from the reference's (first difference at "
                            f"token {next(i for i, (a, b) in enumerate(zip(ours + [None], theirs + [None])) if a != b)}); "
                            "evaluate it against the checkpoint it was exported from")
        for window in windows:
            yield torch.from_numpy(model.logits(window.tolist()))


def _gguf_provenance(path: Path) -> tuple[str, int | None]:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    fmt = fields["gemma3_qat.format"].contents() if "gemma3_qat.format" in fields else "?"
    steps = fields["gemma3_qat.steps"].contents() if "gemma3_qat.steps" in fields else None
    return ("none" if fmt.startswith("none") else fmt), steps


# ------------------------------------------------------------------------------------------------- metrics


def _compare(candidate_logits: Iterator[torch.Tensor], teacher_logits: list[torch.Tensor], labels: torch.Tensor):
    kls, agree, nll, count = [], 0.0, 0.0, 0
    for logits, t_logits, lab in zip(candidate_logits, teacher_logits, labels):
        s = F.log_softmax(logits[:-1].float(), -1)
        t = F.log_softmax(t_logits[:-1].float(), -1)
        y = lab[1:]
        mask = y != -100
        kl = (t.exp() * (t - s)).sum(-1)[mask]
        kls.append(kl)
        agree += float((s.argmax(-1) == t.argmax(-1))[mask].sum())
        nll += float(-s.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum())
        count += int(mask.sum())
    kl = torch.cat(kls)
    return math.exp(nll / count), float(kl.mean()), float(torch.quantile(kl.double(), 0.99)), agree / count, count


def evaluate(candidates: list[str | Path], *, teacher: str | None = None, data: list[str] | None = None,
             seq_len: int = 256, max_windows: int = 32, baseline: str | None = None, log=print) -> EvalReport:
    """Compare checkpoints and GGUF files with the teacher (default: the teacher named in their qat.json)."""
    from gemma3_qat.checkpoint import QAT_JSON, QATMetadata
    from gemma3_qat.models import resolve_model
    from gemma3_qat.tokenizer import load_tokenizer

    paths = [Path(c) for c in candidates]
    for p in paths:
        if not p.exists():
            raise MissingFileError(f"candidate {p} does not exist")
    if teacher is None:
        named = [QATMetadata.read(p / QAT_JSON).teacher for p in paths if p.is_dir() and (p / QAT_JSON).exists()]
        teacher = named[0] if named else None
    teacher = resolve_model(teacher)
    tokenizer = load_tokenizer(teacher)
    windows, labels, data_name = evaluation_windows(tokenizer, data=data, seq_len=seq_len, max_windows=max_windows)
    log(f"evaluating on {len(windows)} windows of {seq_len} tokens from {data_name}")
    t_logits = list(pytorch_logits(teacher, windows))
    nll = sum(float(-F.log_softmax(t[:-1], -1).gather(-1, y[1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)[y[1:] != -100].sum())
              for t, y in zip(t_logits, labels))
    report = EvalReport(str(teacher), data_name, len(windows), seq_len,
                        math.exp(nll / int((labels[:, 1:] != -100).sum())))
    for p in paths:
        if p.suffix == ".gguf":
            fmt, steps = _gguf_provenance(p)
            logits, backend = llama_cpp_logits(p, windows, tokenizer), "llama.cpp"
        else:
            meta = QATMetadata.read(p / QAT_JSON) if (p / QAT_JSON).exists() else None
            fmt, steps = (meta.format, meta.steps) if meta else ("none", None)
            logits, backend = pytorch_logits(p, windows), "pytorch"
        ppl, kl, kl99, top1, n = _compare(logits, t_logits, labels)
        report.results.append(Result(p.name, backend, fmt, steps, ppl, kl, kl99, top1, n))
        log(f"  {p.name} ({backend}): ppl {ppl:.3f}, KL {kl:.5f}, top-1 {100 * top1:.1f}%")
    _recovered(report, baseline)
    return report


def _recovered(report: EvalReport, baseline: str | None) -> None:
    """Fill in the recovered fractions against a PTQ baseline: the named one, else the candidate of the same format
    and backend with 0 steps."""
    for r in report.results:
        if r.steps in (None, 0):
            continue
        base = next((b for b in report.results if b.name == baseline), None) if baseline else next(
            (b for b in report.results if b.steps == 0 and b.format == r.format and b.backend == r.backend), None)
        if base is None:
            continue
        r.baseline = base.name
        if base.perplexity != report.teacher_perplexity:
            r.recovered_ppl = (base.perplexity - r.perplexity) / (base.perplexity - report.teacher_perplexity)
        if base.kl_mean > 0:
            r.recovered_kl = (base.kl_mean - r.kl_mean) / base.kl_mean
