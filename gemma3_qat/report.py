"""The one table renderer of the CLI: every command that prints tables (memory, eval, inspect, export --dry-run)
builds ``Table``s and a ``Report``, and prints ``report.render(style)``, so ``--json`` / ``--markdown`` / ``--csv``
mean the same thing everywhere.

Cells are formatted in one place (``_cell``): integers with thousands separators, floats to 3 decimals, booleans
as yes/NO, None as empty; strings are printed as given, so a view that wants another precision passes a string.
Text output right-aligns the columns whose every cell looks numeric.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import PurePath

from gemma3_qat.errors import InputError

STYLES = ("text", "markdown", "csv", "json")


@dataclass
class Table:
    """A view: a title, column names, rows of cells and notes; printable as text, markdown or CSV."""

    title: str
    columns: list[str]
    rows: list[list]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        for row in self.rows:  # a short row would shift every later cell into the wrong column
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: a row has {len(row)} cells for {len(self.columns)} columns")


@dataclass
class Report:
    """What the CLI prints: the structured result (for --json) and its tables; ``failed`` makes it exit 1."""

    data: object
    tables: list[Table]
    failed: bool = False
    lenient: bool = False  # --json prints values of other types as str() (a file's metadata: numpy scalars...)

    def render(self, style: str = "text") -> str:
        return to_json(self.data, lenient=self.lenient) if style == "json" else render(self.tables, style)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value + 0.0:,.3f}"  # + 0.0: no "-0.000"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def _looks_numeric(text: str) -> bool:
    return text == "" or text.replace(",", "").replace(".", "", 1).lstrip("+-").isdigit()


def _render_text(table: Table) -> str:
    cells = [[_cell(v) for v in row] for row in table.rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(table.columns)]
    numeric = [bool(cells) and all(_looks_numeric(r[i]) for r in cells) for i in range(len(table.columns))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = [table.title]
    if cells:  # an empty table (e.g. no drifted cells) is just its title and notes
        lines += [line(table.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(lines + [f"  {n}" for n in table.notes]) + "\n"


def _render_markdown(table: Table) -> str:
    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in table.notes]) + "\n"


def _render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f"# {table.title}"])
    writer.writerow(table.columns)
    writer.writerows([["" if v is None else v for v in row] for row in table.rows])
    return buf.getvalue()


def render(tables: list[Table], style: str = "text") -> str:
    """``text`` (aligned columns), ``markdown`` or ``csv``."""
    renderer = {"text": _render_text, "markdown": _render_markdown, "csv": _render_csv}.get(style)
    if renderer is None:
        raise InputError(f"unknown output style {style!r}; choose one of: {', '.join(STYLES)}")
    return "\n".join(renderer(t) for t in tables)


def to_json(obj, *, lenient: bool = False) -> str:
    """Any result as JSON: dataclasses as dicts with their derived totals (properties), paths as strings.

    ``lenient``: anything else printed as ``str()`` (file metadata of arbitrary types) instead of a TypeError.
    """
    def default(o):
        if hasattr(o, "__dataclass_fields__"):
            d = {k: getattr(o, k) for k in o.__dataclass_fields__}
            for name, attr in vars(type(o)).items():
                if isinstance(attr, property):
                    d[name] = getattr(o, name)
            return d
        if isinstance(o, PurePath) or lenient:
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serializable")
    return json.dumps(obj, default=default, indent=2)


def style_of(*, as_json: bool = False, as_csv: bool = False, as_markdown: bool = False) -> str:
    """The output style chosen by a command's ``--json`` / ``--csv`` / ``--markdown`` flags (at most one)."""
    chosen = [n for n, on in (("json", as_json), ("csv", as_csv), ("markdown", as_markdown)) if on]
    if len(chosen) > 1:
        raise InputError(f"choose one of {' / '.join('--' + s for s in chosen)}")
    return chosen[0] if chosen else "text"


def plan_report(path, tensors, *, nbytes: int, notes=(), dry_run: bool = True, data=None) -> Report:
    """An export plan: one row per tensor (``gguf_name``, ``ggml_type``, ``shape``, ``nbytes``, ``note``
    attributes, as ``exporters.gguf`` plans them) and the bytes by type, as ``export --dry-run`` prints it."""
    by_type: dict[str, int] = {}
    rows = []
    for t in tensors:
        kind = getattr(t.ggml_type, "name", str(t.ggml_type))
        by_type[kind] = by_type.get(kind, 0) + t.nbytes
        rows.append([t.gguf_name, kind, str(list(t.shape)), t.nbytes, t.note])
    summary = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in by_type.items())
    title = f"{'would write' if dry_run else 'wrote'} {path} (tensor data {nbytes / 1e6:.2f} MB: {summary})"
    return Report(data if data is not None else {"path": str(path), "tensor_bytes": nbytes, "bytes_by_type": by_type,
                                                 "tensors": [dict(zip(PLAN_COLUMNS, r)) for r in rows]},
                  [Table(title, list(PLAN_COLUMNS), rows, [f"note: {n}" for n in notes])])


PLAN_COLUMNS = ("tensor", "type", "shape", "bytes", "note")


@dataclass
class PlanRow:
    """One stored tensor of any export plan in ``plan_report``'s columns (the GGUF planner's tensors have these
    attributes already; safetensors and gemma.cpp plans are mapped to them)."""

    gguf_name: str
    ggml_type: str
    shape: tuple
    nbytes: int
    note: str = ""


def _short(value, limit: int = 80) -> str:
    """One line of at most ``limit`` characters (a chat template is kilobytes of Jinja with newlines)."""
    text = str(value).replace("\n", "\\n")
    return text if len(text) < limit else text[:limit - 3] + "..."


def inspect_report(info: dict) -> Report:
    """A GGUF file as ``gguf_file.inspect_gguf`` describes it: metadata, tensor table, totals. ``--json``
    gives ``info`` whole (values not shortened)."""
    by_type = ", ".join(f"{k} {v:,}" for k, v in info["bytes_by_type"].items())
    tensors = [[t["name"], t["type"], str(t["shape"]), t["bytes"]] for t in info["tensors"]]
    return Report(info, [
        Table(f"{info['path']}: metadata", ["key", "value"], [[k, _short(v)] for k, v in info["metadata"].items()]),
        Table(f"{info['path']}: tensors", ["tensor", "type", "shape", "bytes"], tensors,
              [f"{len(tensors)} tensors, {info['tensor_bytes']:,} bytes of tensor data ({by_type}); file "
               f"{info['file_bytes']:,} bytes"]),
    ], lenient=True)
