"""The reports ``gemma3-qat memory`` prints: each view's tables and its structured result (for ``--json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from gemma3_qat.memory.base import CONTAINERS, GB, GROUPS, TABLE_FORMATS, MemoryInputError
from gemma3_qat.memory.baseline import BASELINE_MODELS, check_baseline, write_baseline
from gemma3_qat.memory.kv import kv_cache
from gemma3_qat.memory.measure import measure_gguf
from gemma3_qat.memory.spec import ModelSpec, model_spec, param_counts
from gemma3_qat.memory.table3 import TABLE3_CONTEXT, TABLE3_HOMES, table3
from gemma3_qat.memory.training import TrainingOptions, training_memory
from gemma3_qat.memory.weights import WeightOptions, embedding_for, weight_bytes
from gemma3_qat.report import Report, Table


def _unit(largest: float) -> tuple[str, float]:
    """GB for real models, MB or KB for the tiny ones (so that they do not print as 0.000)."""
    for name, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if largest >= size / 10:
            return name, size
    return "bytes", 1.0


def _unit_label(unit: str, size: float) -> str:
    return unit if size == 1.0 else f"{unit} = 1e{round(math.log10(size))} bytes"


def _scaled(nbytes: float, size: float) -> float | int:
    return nbytes if size == 1.0 else round(nbytes / size, 3)


def _gb(nbytes: float) -> float:
    return round(nbytes / GB, 3)


def overview_report(context: int = TABLE3_CONTEXT, *, batch: int = 1, kv_dtype: str = "bf16",
                    formats=TABLE_FORMATS, embedding: str = "auto", vision: str = "auto") -> Report:
    """The released sizes (270M to 27B): weights per format in both containers, KV cache, totals (first principles)."""
    rows, data = [], []
    for name in BASELINE_MODELS:
        kv = kv_cache(name, context, batch=batch, dtype=kv_dtype)
        for fmt in formats:
            emb = embedding_for(fmt, embedding)
            gguf = weight_bytes(name, WeightOptions(fmt, "gguf", emb, vision))
            compact = weight_bytes(name, WeightOptions(fmt, "compact", emb, vision))
            rows.append([name, fmt, _gb(gguf.total), _gb(compact.total), _gb(kv.total), _gb(gguf.total + kv.total),
                         _gb(compact.total + kv.total), _gb(kv.every_layer_global)])
            data.append({"model": name, "format": fmt, "gguf": gguf, "compact": compact, "kv": kv})
    title = (f"Gemma 3 memory, first principles (GB = 1e9 bytes): weights, and + the 5:1 {kv_dtype} KV cache at "
             f"{context:,} tokens, batch {batch}")
    notes = ["gguf = what `gemma3-qat export --to gguf` writes (+ mmproj for 4B+); compact = compressed-tensors /"
             " gemma.cpp (int4 4 bits + fp16 scales, sfp8 1 byte + fp32 tensor scale)",
             f"embedding {embedding}: gguf Q8_0 (the exporter's auto), compact bf16; --model NAME for the details",
             "KV all-global: every layer holding the whole context (llama.cpp swa_full=True)"]
    notes += [f"warning: {w}" for w in sorted({w for d in data for w in d["kv"].warnings})]
    table = Table(title, ["model", "format", "gguf", "compact", "KV 5:1", "gguf+KV", "compact+KV", "KV all-global"],
                  rows, notes)
    return Report(data, [table])


def model_report(model: str | ModelSpec, formats=TABLE_FORMATS, containers=CONTAINERS, *, context: int = 32_768,
                 batch: int = 1, kv_dtype: str = "bf16", embedding: str = "auto", vision: str = "auto") -> Report:
    """One model: parameters by group, bytes by group per format and container, KV cache by layer type."""
    spec = model_spec(model)
    counts = param_counts(spec)
    kv = kv_cache(spec, context, batch=batch, dtype=kv_dtype)
    groups = [g for g in GROUPS if getattr(counts, g)]
    header = (f"Gemma 3 {spec.name} ({spec.source}): {spec.layers} layers ({spec.global_layers} global, "
              f"{spec.local_layers} local, window {spec.sliding_window:,}), hidden {spec.hidden:,}, vocab "
              f"{spec.vocab:,}, max context {spec.context:,}")
    params = Table(header, ["group", "parameters", "millions"],
                   [[g, getattr(counts, g), f"{getattr(counts, g) / 1e6:,.1f}"] for g in groups]
                   + [["non-embedding (Table 1)", counts.non_embedding, f"{counts.non_embedding / 1e6:,.1f}"],
                      ["total", counts.total, f"{counts.total / 1e6:,.1f}"]])
    results = []
    for fmt in formats:
        for container in containers:
            emb = embedding_for(fmt, embedding)
            results.append(weight_bytes(spec, WeightOptions(fmt, container, emb, vision)))
    unit, size = _unit(max([w.total + kv.every_layer_global for w in results] + [1]))
    rows = [[w.format, w.container, w.types.get("embedding", "")] + [_scaled(w.by_group[g], size) for g in groups]
            + [_scaled(w.total, size), _scaled(w.total + kv.total, size)] for w in results]
    notes = list(dict.fromkeys(f"{w.format} {w.container}: {w.note}" for w in results if w.note))
    notes.append("gguf: norms F32, vision = the mmproj file (F16 matrices, F32 vectors); compact: unquantized "
                 "tensors bf16")
    weights = Table(f"weights by group ({_unit_label(unit, size)}); +KV = the 5:1 {kv_dtype} cache at {context:,} "
                    f"tokens, batch {batch}", ["format", "container", "emb type"] + groups + ["total", "+KV"],
                    rows, notes)
    kv_rows = [[f"global ({kv.global_layers} layers x {context:,} tokens)", _scaled(kv.global_bytes, size)],
               [f"local ({kv.local_layers} layers x {kv.local_tokens:,} tokens)", _scaled(kv.local_bytes, size)],
               ["total (5:1 sliding window)", _scaled(kv.total, size)],
               ["every layer global (llama.cpp swa_full=True)", _scaled(kv.every_layer_global, size)],
               ["saved by the sliding window", _scaled(kv.every_layer_global - kv.total, size)]]
    kv_table = Table(f"KV cache, {kv_dtype}, {context:,} tokens, batch {batch} ({unit}; "
                     f"{kv.bytes_per_token_layer:,} bytes per token and layer)", ["part", unit], kv_rows,
                     [f"warning: {w}" for w in kv.warnings])
    return Report({"model": spec, "params": counts, "weights": results, "kv": kv}, [params, weights, kv_table])


def table3_report(embedding: str = "auto") -> Report:
    result = table3(embedding=embedding)
    rows = [[f"{c.model.upper()}{' +KV' if c.kv else ''}", c.column, c.published, round(c.paper, 3), c.reproduced,
             round(c.residual, 3), round(c.first_principles, 3), round(c.difference, 3), c.reason]
            for c in result.cells]
    notes = [f"reproduced {result.reproduced} of {len(result.cells)} cells to the printed 0.1 GB",
             f"paper convention: {result.convention}",
             "first principles: exact counts; " + ", ".join(f"{k} in {v}" for k, v in result.homes.items())
             + f"; embedding {embedding}; +KV = the true 5:1 bf16 cache at {TABLE3_CONTEXT:,} tokens"]
    notes += [f"not reproduced: {c.model.upper()}{' +KV' if c.kv else ''} {c.column}: residual "
              f"{c.residual:+.3f} GB ({c.reason.split(';')[0]})" for c in result.misses]
    table = Table("Table 3 of the Gemma 3 report vs our reproduction (GB = 1e9 bytes)",
                  ["model", "column", "published", "paper conv.", "repro", "residual", "first princ.", "diff",
                   "reason"], rows, notes)
    return Report(result, [table])


def training_report(model: str | ModelSpec, base: TrainingOptions) -> Report:
    """Four scenarios side by side: live teacher or teacher cache, with and without gradient checkpointing."""
    scenarios = {
        "live teacher": replace(base, teacher="live", gradient_checkpointing=False),
        "live + ckpt": replace(base, teacher="live", gradient_checkpointing=True),
        "teacher cache": replace(base, teacher="cache", gradient_checkpointing=False),
        "cache + ckpt": replace(base, teacher="cache", gradient_checkpointing=True),
    }
    results = {k: training_memory(model, v) for k, v in scenarios.items()}
    first = next(iter(results.values()))
    unit, size = _unit(max(r.upper_bound for r in results.values()))
    rows = [[comp] + [_scaled(r.components[comp], size) for r in results.values()] for comp in first.components]
    rows += [[f"phase: {p}"] + [_scaled(r.phases[p], size) for r in results.values()] for p in first.phases]
    rows.append(["PEAK (estimate)"] + [_scaled(r.peak, size) for r in results.values()])
    rows.append(["sum of all (upper bound)"] + [_scaled(r.upper_bound, size) for r in results.values()])
    precision = {"bf16": "bf16 autocast", "no": "fp32"}[first.options.mixed_precision]
    title = (f"QAT training memory per GPU, {first.model}: {base.gpus} GPU(s), {base.device} ({precision}), micro-batch "
             f"{base.micro_batch} x {base.seq_len:,} tokens, KD {base.kd} ({_unit_label(unit, size)})")
    notes = first.notes + [
        "activations per token and layer: 8 hidden fp32 (norms) + 4 ffn + 7 q + 2 kv in the compute dtype; "
        "checkpointing keeps each layer's input and recomputes one layer",
        "logits: the loss runs in chunks of positions with the heads inside (qat.head): [chunk, vocab] fp32 "
        "buffers, 7 (full KD) or 5; a teacher cache holds k ids + log-probs per token",
        "peak = the largest phase (activations are freed as gradients appear); an estimate, checked against "
        "measured CPU peaks to within a factor of 2 (tests/test_memory.py)"]
    return Report(results, [Table(title, ["component"] + list(results), rows, notes)])


def measure_report(path: str | Path, *, format: str | None = None, embedding: str = "auto",
                   per_tensor: bool = False) -> Report:
    if Path(path).suffix == ".sbs":
        return _measure_sbs_report(path, per_tensor=per_tensor)
    m = measure_gguf(path, format=format, embedding=embedding)
    by_part: dict[str, list[int]] = {}
    for t in m.tensors:
        key = "blk.* (layers)" if t.name.startswith("blk.") else (
            "v.blk.* (vision layers)" if t.name.startswith("v.blk.") else t.name)
        acc = by_part.setdefault(key, [0, 0, 0])
        acc[0] += 1
        acc[1] += t.predicted_bytes
        acc[2] += t.actual_bytes
    rows = [[k, v[0], v[1], v[2], v[2] - v[1]] for k, v in by_part.items()]
    rows.append(["TENSOR DATA", len(m.tensors), m.predicted_tensor_bytes, m.actual_tensor_bytes,
                 m.actual_tensor_bytes - m.predicted_tensor_bytes])
    verdict = "EXACT: every tensor matches the prediction" if m.exact else f"{len(m.mismatches)} tensor(s) differ"
    tables = [Table(f"{m.path} ({m.architecture}, format {m.format}, embedding {m.embedding}): {verdict}",
                    ["tensors", "count", "predicted bytes", "actual bytes", "diff"], rows,
                    [] if per_tensor else ["tensor by tensor: --csv or --json"]),
              Table("file layout (bytes)", ["part", "bytes"],
                    [["header (magic, version, counts)", m.header_bytes],
                     ["metadata key-values (tokenizer included)", m.metadata_bytes],
                     ["tensor infos", m.tensor_info_bytes], ["alignment padding", m.alignment_padding],
                     ["tensor data", m.actual_tensor_bytes], ["file", m.file_bytes]])]
    if m.mismatches:
        tables.append(Table("tensors that differ", ["tensor", "predicted", "bytes", "actual", "bytes", "why"],
                            [[t.name, t.predicted_type, t.predicted_bytes, t.actual_type, t.actual_bytes, t.note]
                             for t in m.mismatches]))
    if per_tensor:
        tables.append(Table("tensor by tensor", ["tensor", "predicted type", "predicted bytes", "actual type",
                                                 "actual bytes", "match", "note"],
                            [[t.name, t.predicted_type, t.predicted_bytes, t.actual_type, t.actual_bytes,
                              t.matches, t.note] for t in m.tensors]))
    return Report(m, tables)


def _measure_sbs_report(path: str | Path, *, per_tensor: bool = False) -> Report:
    """A gemma.cpp file's exact bytes by part, its tensors checked against the shapes its own config implies."""
    from gemma3_qat.runtimes.gemma_cpp import measure_sbs

    m = measure_sbs(path)
    verdict = ("EXACT: every tensor has the shape and bytes its config implies" if m["exact"]
               else f"{len(m['mismatches'])} problem(s)")
    rows = [[f"tensors {t}", n] for t, n in m["bytes_by_type"].items()]
    rows += [[f"metadata: {k}", n] for k, n in m["metadata_bytes"].items()]
    rows += [["alignment, end padding, directory", m["padding_and_directory_bytes"]], ["file", m["file_bytes"]]]
    tables = [Table(f"{m['path']} (gemma.cpp .sbs): {verdict}", ["part", "bytes"], rows, list(m["mismatches"]))]
    if per_tensor:
        tables.append(Table("tensor by tensor", ["tensor", "type", "bytes"],
                            [[t["name"], t["type"], t["bytes"]] for t in m["tensors"]]))
    return Report(m, tables, failed=not m["exact"])


def check_report(path: str | Path, tolerance: float = 0.0) -> Report:
    drifts = check_baseline(path, tolerance)
    rows = [[d.cell, d.baseline, d.current, "new/removed" if math.isinf(d.relative) else f"{d.relative:+.4%}"]
            for d in drifts]
    verdict = "no drift" if not drifts else f"{len(drifts)} drifted cell(s)"
    notes = [f"tolerance {tolerance:g} (relative)"]
    if drifts:
        notes.append(f"if the change is intended: gemma3-qat memory --update-baseline {path}")
    return Report({"baseline": str(path), "tolerance": tolerance, "drifted": drifts},
                  [Table(f"baseline {path}: {verdict}", ["cell", "baseline", "current", "relative"], rows, notes)],
                  failed=bool(drifts))


def update_baseline_report(path: str | Path) -> Report:
    baseline = write_baseline(path)
    return Report(baseline, [Table(f"wrote {path}: {len(baseline['cells'])} cells", ["cell", "bytes"],
                                   [[k, v] for k, v in baseline["cells"].items()])])


# ============================================================================================= plot

PLOT_CONTEXTS = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k


def plot(path: str | Path, model: str | ModelSpec = "27b", *, formats=TABLE_FORMATS, kv_dtype: str = "bf16",
         models=BASELINE_MODELS) -> Path:
    """Two panels: KV memory vs context (5:1 vs every layer global) for ``models``; weights + KV per format for
    ``model``. Needs matplotlib (optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MemoryInputError("--plot needs matplotlib: pip install matplotlib (or pip install "
                               "'gemma3-qat[plot]')") from None
    spec = model_spec(model)
    fig, (ax_kv, ax_total) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [c / 1024 for c in PLOT_CONTEXTS]
    for name in models:
        kvs = [kv_cache(name, c, dtype=kv_dtype) for c in PLOT_CONTEXTS]
        line, = ax_kv.plot(xs, [k.total / GB for k in kvs], marker="o", label=f"{name} 5:1")
        ax_kv.plot(xs, [k.every_layer_global / GB for k in kvs], ls="--", color=line.get_color(),
                   label=f"{name} every layer global")
    ax_kv.set(xscale="log", xlabel="context (k tokens)", ylabel="KV cache (GB)", title=f"KV cache, {kv_dtype}")
    ax_kv.set_xticks(xs, [f"{x:g}" for x in xs])
    ax_kv.legend(fontsize=7)
    for fmt in formats:
        w = weight_bytes(spec, WeightOptions(fmt, TABLE3_HOMES.get(fmt, "gguf"))).total
        ax_total.plot(xs, [(w + kv_cache(spec, c, dtype=kv_dtype).total) / GB for c in PLOT_CONTEXTS], marker="o",
                      label=f"{fmt} ({TABLE3_HOMES.get(fmt, 'gguf')})")
    ax_total.set(xscale="log", xlabel="context (k tokens)", ylabel="weights + KV (GB)",
                 title=f"{spec.name}: weights + 5:1 KV cache")
    ax_total.set_xticks(xs, [f"{x:g}" for x in xs])
    ax_total.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ============================================================================================= the command's one call


@dataclass(frozen=True)
class MemoryQuery:
    """What ``gemma3-qat memory`` was asked, validated on creation: at most one of the special views (``table3``,
    ``training``, ``measure``, ``check``, ``update_baseline``); without one, the overview of the four sizes, or
    one ``model`` in detail. ``report()`` builds the view."""

    model: str | None = None
    formats: tuple[str, ...] = ()  # --format, repeatable; none: Table 3's four (--measure: read from the file)
    container: str | None = None  # None: both
    embedding: str = "auto"
    vision: str = "auto"
    context: int = TABLE3_CONTEXT
    kv_dtype: str = "bf16"
    batch: int = 1  # sequences of the KV cache; micro-batch per GPU for --training
    table3: bool = False
    training: bool = False
    seq_len: int = 2048
    gpus: int = 1
    device: str = "cuda"
    mixed_precision: str = "auto"
    kd: str = "full"
    measure: str | Path | None = None
    check: str | Path | None = None
    update_baseline: str | Path | None = None
    tolerance: float = 0.0
    per_tensor: bool = False  # --measure: the tensor-by-tensor table too (machine-readable styles)

    def __post_init__(self):
        views = [n for n, on in (("--table3", self.table3), ("--training", self.training),
                                 ("--measure", self.measure), ("--check", self.check),
                                 ("--update-baseline", self.update_baseline)) if on]
        if len(views) > 1:
            raise MemoryInputError(f"choose one of {' / '.join(views)}")
        object.__setattr__(self, "formats", tuple(self.formats or ()))

    @property
    def chosen_formats(self) -> tuple[str, ...]:
        return self.formats or TABLE_FORMATS

    def report(self) -> Report:
        if self.table3:
            return table3_report(self.embedding)
        if self.training:
            return training_report(self.model or "27b", TrainingOptions(
                seq_len=self.seq_len, micro_batch=self.batch, gpus=self.gpus, device=self.device,
                mixed_precision=self.mixed_precision, kd=self.kd,
                quantize_embeddings=self.embedding == "quantized"))
        if self.measure:
            fmt = self.formats[0] if self.formats else None  # the file's format, when it does not record it
            return measure_report(self.measure, format=fmt, embedding=self.embedding, per_tensor=self.per_tensor)
        if self.check:
            return check_report(self.check, self.tolerance)
        if self.update_baseline:
            return update_baseline_report(self.update_baseline)
        if self.model is None:
            return overview_report(self.context, batch=self.batch, kv_dtype=self.kv_dtype,
                                   formats=self.chosen_formats, embedding=self.embedding, vision=self.vision)
        return model_report(self.model, self.chosen_formats, (self.container,) if self.container else CONTAINERS,
                            context=self.context, batch=self.batch, kv_dtype=self.kv_dtype,
                            embedding=self.embedding, vision=self.vision)
