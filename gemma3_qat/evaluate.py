"""Evaluate candidates against the teacher: PyTorch checkpoints (fake quantization applied from ``qat.json``) and
GGUF files run in real llama.cpp (through llama-cpp-python), so the number users see is the one of the file they
ship.

Per candidate, on held-out windows: perplexity, mean and p99 per-token KL(teacher || candidate), top-1 agreement
with the teacher; with a post-training-quantization baseline, the fraction of its degradation that QAT recovers,
``(m_PTQ - m_QAT) / (m_PTQ - m_teacher)`` for perplexity and for KL (the teacher's KL is 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gemma3_qat.errors import InputError, MissingFileError
from gemma3_qat.report import Report, Table


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
    bits: list[float] | None = None  # GGUF: [bits per weight of the matmuls, of the whole file]


@dataclass
class EvalReport:
    teacher: str
    data: str
    windows: int
    seq_len: int
    teacher_perplexity: float
    results: list[Result] = field(default_factory=list)

    def report(self) -> Report:
        """The comparison as one table (``gemma3_qat.report``: the same text / markdown / csv / json as every
        command). Cells are preformatted strings: each metric keeps its own precision."""
        head = ["candidate", "backend", "format", "steps", "bits/w", "ppl", "KL mean", "KL p99", "top-1",
                "recovered ppl", "recovered KL"]
        rows = [["teacher", "pytorch", "-", "-", "-", f"{self.teacher_perplexity:.3f}", "0", "0", "100.0%", "", ""]]
        for r in self.results:
            pct = lambda x: "" if x is None else f"{100 * x:.0f}%"  # noqa: E731
            bits = "-" if r.bits is None else f"{r.bits[0]:.2f} / {r.bits[1]:.2f}"
            rows.append([r.name, r.backend, r.format, "-" if r.steps is None else str(r.steps), bits,
                         f"{r.perplexity:.3f}",
                         f"{r.kl_mean:.5f}", f"{r.kl_p99:.4f}", f"{100 * r.top1:.1f}%", pct(r.recovered_ppl),
                         pct(r.recovered_kl)])
        title = (f"teacher {self.teacher} vs candidates: {self.windows} windows of {self.seq_len} tokens from "
                 f"{self.data}")
        notes = ["KL = KL(teacher || candidate) per token; recovered = (PTQ - QAT) / (PTQ - teacher), against the "
                 "0-step candidate of the same format and backend (or --baseline)",
                 "bits/w = bits per weight of the attention and MLP matmuls / of the whole file (GGUF files)"]
        return Report(self, [Table(title, head, rows, notes)])

    def to_json(self) -> str:
        return self.report().render("json")

    def table(self, markdown: bool = False, style: str | None = None) -> str:
        """``style``: text, markdown, csv or json (``markdown=True`` is ``style="markdown"``)."""
        return self.report().render(style or ("markdown" if markdown else "text"))


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
            src = DataSource.parse(spec)
            docs.extend(tokenize_documents(load_documents(src), tokenizer, path=src.path))
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


# Logits of one forward at most this many bytes (fp32): at Gemma's 262,144-piece vocabulary one 256-token window
# is 268 MB, so the teacher and PyTorch candidates run one window at a time; small vocabularies batch 8.
LOGITS_BUDGET_BYTES = 256 * 2**20


def logits_batch(windows: torch.Tensor, vocab: int, budget: int = LOGITS_BUDGET_BYTES, most: int = 8) -> int:
    """Windows per forward such that the batch's fp32 logits stay within ``budget`` (at least one window)."""
    per_window = max(1, windows.shape[1] * vocab * 4)
    return max(1, min(most, budget // per_window))


def load_for_eval(checkpoint: str | Path):
    """A checkpoint in eval mode (fp32), with fake quantization from its ``qat.json`` if it has one: each tensor on
    the lattice qat.json records for it (a mixture's differ by tensor; an older qat.json: its format)."""
    from gemma3_qat.checkpoint import QAT_JSON, QATMetadata
    from gemma3_qat.sources import load_gemma3
    from gemma3_qat.qat.prepare import prepare

    model = load_gemma3(str(checkpoint), dtype=torch.float32).eval()
    qat_json = Path(checkpoint) / QAT_JSON
    if qat_json.exists():
        meta = QATMetadata.read(qat_json)
        prepare(model, meta.format, quantize_embeddings=meta.quantize_embeddings, lattices=meta.lattices or None)
    return model


def model_logits(model, windows: torch.Tensor, batch: int | None = None) -> Iterator[torch.Tensor]:
    """Logits ``[seq, vocab]`` per window of a loaded model; ``batch`` windows per forward (default: as many as
    ``LOGITS_BUDGET_BYTES`` allows), so only one forward's logits are alive at a time."""
    batch = batch or logits_batch(windows, model.get_output_embeddings().weight.shape[0])
    for i in range(0, len(windows), batch):
        # no_grad around the forward only: a generator suspended inside the context would leave gradients off
        # in the caller's thread until it is exhausted
        with torch.no_grad():
            logits = model(input_ids=windows[i:i + batch]).logits.float()
        yield from logits
        del logits


def pytorch_logits(checkpoint: str | Path, windows: torch.Tensor, batch: int | None = None) -> Iterator[torch.Tensor]:
    """Logits per window of a checkpoint, with fake quantization from its ``qat.json`` if it has one."""
    yield from model_logits(load_for_eval(checkpoint), windows, batch)


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


def _same_source(a: str | Path | None, b: str | Path | None) -> bool:
    if a is None or b is None:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return (pa.resolve() == pb.resolve()) if pa.exists() and pb.exists() else str(a) == str(b)


def tokenizer_mismatch(path: str | Path, ours: list[int], theirs: list[int], reference: str | Path | None,
                       exported_from: str | None) -> str:
    """The one-line message for a GGUF whose tokenizer differs from the reference's, blaming the right thing:
    the GGUF's vocabulary when the file records the reference as its teacher, else the choice of reference."""
    i = next(i for i, (a, b) in enumerate(zip(ours + [None], theirs + [None])) if a != b)
    where = (f"first difference at token {i}: {ours[i] if i < len(ours) else 'end'} in transformers, "
             f"{theirs[i] if i < len(theirs) else 'end'} in llama.cpp")
    name = Path(path).name
    if _same_source(exported_from, reference):
        return (f"{name}: its tokenizer differs from {reference}'s although the file was "
                f"exported from it ({where}): its GGUF vocabulary does not reproduce the tokenizer; re-export it "
                "with this version of gemma3-qat (`gemma3-qat export --to gguf --force`)")
    if exported_from:
        return (f"{name}: its tokenizer differs from {reference}'s ({where}); the file records teacher "
                f"{exported_from}: evaluate it with --teacher {exported_from}")
    return (f"{name}: its tokenizer differs from {reference}'s ({where}) and the file does not record its teacher: "
            "pass the checkpoint it was exported from with --teacher")


def llama_cpp_logits(path: str | Path, windows: torch.Tensor, tokenizer, reference: str | Path | None = None,
                     exported_from: str | None = None) -> Iterator[torch.Tensor]:
    """Logits per window of a GGUF file in llama.cpp, after checking that it tokenizes like ``tokenizer`` (the
    reference ``reference``'s; ``exported_from``: the teacher the file records, which the message names)."""
    with LlamaCppModel(path, n_ctx=windows.shape[1]) as model:
        ours = tokenizer(TOKENIZER_PROBE).input_ids
        theirs = model.tokenize(TOKENIZER_PROBE)
        if ours != theirs:
            raise EvalError(tokenizer_mismatch(path, ours, theirs, reference or "the reference", exported_from))
        for window in windows:
            yield torch.from_numpy(model.logits(window.tolist()))


def _gguf_provenance(path: Path) -> tuple[str, int | None, str | None]:
    """The format, steps and teacher a GGUF file records (our exporter's ``gemma3_qat.*`` keys)."""
    from gemma3_qat.gguf_file import open_gguf

    # validated before llama.cpp sees the file (evaluate() reads this first): a torn GGUF is one line naming it
    fields = open_gguf(path).fields
    fmt = fields["gemma3_qat.format"].contents() if "gemma3_qat.format" in fields else "?"
    steps = fields["gemma3_qat.steps"].contents() if "gemma3_qat.steps" in fields else None
    teacher = fields["gemma3_qat.teacher"].contents() if "gemma3_qat.teacher" in fields else None
    return ("none" if fmt.startswith("none") else fmt), steps, teacher


# ------------------------------------------------------------------------------------------------- metrics


def compare_logits(candidate_logits, teacher_logits, labels: torch.Tensor):
    """(perplexity, KL mean, KL p99, top-1, tokens) of a candidate against the teacher (streams or lists)."""
    return _compare_streams(candidate_logits, teacher_logits, labels)[:5]


def _compare_streams(candidate_logits: Iterator[torch.Tensor], teacher_logits: Iterator[torch.Tensor],
                     labels: torch.Tensor):
    """Metrics of a candidate against the teacher, one window of both at a time (both are streams: neither is
    held whole), and the teacher's perplexity on the same tokens, so the teacher needs no pass of its own."""
    from gemma3_qat.qat.distill import token_metrics  # the one definition of KL, top-1 and NLL

    kls, agree, nll, t_nll, count = [], 0.0, 0.0, 0.0, 0
    for logits, t_logits, lab in zip(candidate_logits, teacher_logits, labels, strict=True):
        m = token_metrics(logits[:-1], lab[1:], teacher_logits=t_logits[:-1])
        mask = m["mask"]
        kls.append(m["kl"][mask])
        agree += float(m["top1"][mask].sum())
        nll += float(m["nll"][mask].sum())
        t_nll += float(m["teacher_nll"][mask].sum())
        count += int(mask.sum())
        del logits, t_logits, m
    kl = torch.cat(kls)
    return (math.exp(nll / count), float(kl.mean()), float(torch.quantile(kl.double(), 0.99)), agree / count, count,
            math.exp(t_nll / count))


def evaluate(candidates: list[str | Path], *, teacher: str | None = None, data: list[str] | None = None,
             seq_len: int = 256, max_windows: int = 32, baseline: str | None = None, log=print) -> EvalReport:
    """Compare checkpoints (PyTorch), GGUF files (llama.cpp) and .sbs files (gemma.cpp) with the teacher (default:
    the teacher named in their qat.json)."""
    from gemma3_qat.checkpoint import QAT_JSON, Checkpoint, QATMetadata
    from gemma3_qat.gguf_file import validate_gguf
    from gemma3_qat.sources import resolve_model
    from gemma3_qat.qat.distill import token_metrics
    from gemma3_qat.tokenizer import load_tokenizer

    paths = [Path(c) for c in candidates]
    for p in paths:
        if not p.exists():
            raise MissingFileError(f"candidate {p} does not exist")
        # every candidate checked before the teacher runs (sizes and headers; the weights' checksums when it is
        # loaded): a torn file is one line naming it, minutes sooner
        if p.suffix == ".gguf":
            validate_gguf(p)
        elif p.suffix == ".sbs":
            from gemma3_qat.exporters.sbs import read_sbs

            read_sbs(p)
        else:
            Checkpoint(p, verify=False)
    if teacher is None:
        named = [QATMetadata.read(p / QAT_JSON).teacher for p in paths if p.is_dir() and (p / QAT_JSON).exists()]
        teacher = named[0] if named else None
    teacher = resolve_model(teacher)
    tokenizer = load_tokenizer(teacher)
    windows, labels, data_name = evaluation_windows(tokenizer, data=data, seq_len=seq_len, max_windows=max_windows)
    log(f"evaluating on {len(windows)} windows of {seq_len} tokens from {data_name}")
    # the teacher stays loaded and streams its logits alongside each candidate's, one forward at a time: at a
    # 262k vocabulary all windows' logits would be GBs (15.6 GB for 32 x 256 tokens at 270M)
    teacher_model = load_for_eval(teacher)
    if not paths:
        teacher_nll = (token_metrics(t[:-1], y[1:]) for t, y in zip(model_logits(teacher_model, windows), labels))
        nll = sum(float(m["nll"][m["mask"]].sum()) for m in teacher_nll)
        t_ppl = math.exp(nll / int((labels[:, 1:] != -100).sum()))
    report = EvalReport(str(teacher), data_name, len(windows), seq_len, math.nan if paths else t_ppl)
    for p in paths:
        if p.suffix == ".gguf":
            fmt, steps, recorded = _gguf_provenance(p)
            logits, backend = llama_cpp_logits(p, windows, tokenizer, teacher, recorded), "llama.cpp"
        elif p.suffix == ".sbs":
            from gemma3_qat.runtimes.gemma_cpp import gemma_cpp_logits, sbs_provenance

            fmt, steps = sbs_provenance(p)
            logits, backend = gemma_cpp_logits(p, windows, tokenizer), "gemma.cpp"
        else:
            meta = QATMetadata.read(p / QAT_JSON) if (p / QAT_JSON).exists() else None
            fmt, steps = (meta.format, meta.steps) if meta else ("none", None)
            logits, backend = pytorch_logits(p, windows), "pytorch"
        ppl, kl, kl99, top1, n, t_ppl = _compare_streams(logits, model_logits(teacher_model, windows), labels)
        report.teacher_perplexity = t_ppl  # the same windows and mask for every candidate
        bits = None
        if p.suffix == ".gguf":
            from gemma3_qat.gguf_file import bits_per_weight

            bits = list(bits_per_weight(p))
        report.results.append(Result(p.name, backend, fmt, steps, ppl, kl, kl99, top1, n, bits=bits))
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
        if base is not None:
            set_recovered(r, base, report.teacher_perplexity)


def set_recovered(result: Result, base: Result, teacher_perplexity: float) -> None:
    """``result``'s recovered fractions against ``base`` (a PTQ file): ``(base - result) / (base - teacher)`` for
    perplexity, ``(base - result) / base`` for KL (the teacher's KL to itself is 0)."""
    result.baseline = base.name
    if base.perplexity != teacher_perplexity:
        result.recovered_ppl = (base.perplexity - result.perplexity) / (base.perplexity - teacher_perplexity)
    if base.kl_mean > 0:
        result.recovered_kl = (base.kl_mean - result.kl_mean) / base.kl_mean
