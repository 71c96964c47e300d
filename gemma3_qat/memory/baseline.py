"""The CI baseline: first-principles bytes of every released size x format x container, and the check for drift.

Built from the architecture records alone (``models.GEMMA3_SHAPES``): no checkpoint, no fixture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from gemma3_qat.errors import MissingFileError
from gemma3_qat.memory.base import CONTAINERS, TABLE_FORMATS, MemoryInputError
from gemma3_qat.memory.kv import kv_cache
from gemma3_qat.memory.spec import GEMMA3_SHAPES
from gemma3_qat.memory.table3 import TABLE3_CONTEXT
from gemma3_qat.memory.weights import WeightOptions, weight_bytes

BASELINE_MODELS = tuple(GEMMA3_SHAPES)
BASELINE_FORMATS = (*TABLE_FORMATS, "q4_k_m")  # Table 3's and the file most GGUF users run


def baseline_cells(context: int = TABLE3_CONTEXT, kv_dtype: str = "bf16") -> dict[str, int]:
    """First-principles bytes of the released architectures (``models.GEMMA3_SHAPES``): every size x format x
    container x {weights, +kv}."""
    cells: dict[str, int] = {}
    for name in BASELINE_MODELS:
        kv = kv_cache(name, context, dtype=kv_dtype).total
        for fmt in BASELINE_FORMATS:
            for container in CONTAINERS:
                w = weight_bytes(name, WeightOptions(fmt, container)).total
                cells[f"{name}/{fmt}/{container}/weights"] = w
                cells[f"{name}/{fmt}/{container}/+kv"] = w + kv
    return cells


def make_baseline(context: int = TABLE3_CONTEXT, kv_dtype: str = "bf16") -> dict:
    return {"about": "gemma3-qat memory first-principles bytes; regenerate deliberately with "
                     "`gemma3-qat memory --update-baseline benchmarks/memory-baseline.json`",
            "units": "bytes", "kv_context": context, "kv_dtype": kv_dtype,
            "cells": baseline_cells(context, kv_dtype)}


def write_baseline(path: str | Path) -> dict:
    baseline = make_baseline()
    Path(path).write_text(json.dumps(baseline, indent=1) + "\n")
    return baseline


@dataclass
class Drift:
    cell: str
    baseline: int | None
    current: int | None

    @property
    def relative(self) -> float:
        if not self.baseline or self.current is None:
            return math.inf
        return self.current / self.baseline - 1


def check_baseline(path: str | Path, tolerance: float = 0.0) -> list[Drift]:
    """Cells whose current value differs from the baseline by more than ``tolerance`` (relative); cells that
    appeared or disappeared count as drifted."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"baseline {path} does not exist; create it with --update-baseline {path}")
    if tolerance < 0:
        raise MemoryInputError(f"--tolerance must be 0 or more, got {tolerance}")
    stored = json.loads(path.read_text())
    current = baseline_cells(stored.get("kv_context", TABLE3_CONTEXT), stored.get("kv_dtype", "bf16"))
    old = stored.get("cells", {})
    drifts = []
    for cell in sorted(set(old) | set(current)):
        d = Drift(cell, old.get(cell), current.get(cell))
        if d.baseline is None or d.current is None or abs(d.relative) > tolerance:
            drifts.append(d)
    return drifts
