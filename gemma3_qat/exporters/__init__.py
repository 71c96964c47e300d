"""Exporters: GGUF (``gguf``), safetensors (``safetensors``), gemma.cpp (``gemma_cpp``, container in ``sbs``).

``export`` is the one entry point (the CLI's ``export`` calls it): a target (``--to``) is a ``Target``, which names
the options it takes and the function that writes it; an option of another target is refused, in one line, not
ignored. Every target's plan gives the same view (``ExportPlanView``: ``path``, ``nbytes``, ``notes``, ``rows()``),
which ``report.plan_report`` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gemma3_qat.errors import InputError


class ExportPlanView(Protocol):
    """What every target's plan offers the report: where, how many tensor bytes, notes, and one row per tensor."""

    path: Path

    @property
    def nbytes(self) -> int: ...

    @property
    def notes(self) -> list[str]: ...

    def rows(self) -> list: ...  # report.PlanRow-like: gguf_name, ggml_type, shape, nbytes, note


@dataclass(frozen=True)
class Target:
    """One ``--to``: the export options it takes (keyword names: the CLI's flags with ``_`` for ``-``)."""

    name: str
    options: tuple[str, ...]
    summary: str
    keywords: tuple[tuple[str, str], ...] = ()  # option -> the export function's keyword, where they differ

    def run(self, checkpoint, output, **kwargs) -> ExportPlanView:
        if self.name == "gguf":
            from gemma3_qat.exporters.gguf import export_gguf as write
        elif self.name == "safetensors":
            from gemma3_qat.exporters.safetensors import export_safetensors as write
        else:
            from gemma3_qat.exporters.gemma_cpp import export_gemma_cpp as write
        return write(checkpoint, output, **kwargs)


TARGETS = {t.name: t for t in (
    Target("gguf", ("type", "embedding_type", "lossy"), "llama.cpp, Ollama, LM Studio", (("type", "plain_type"),)),
    Target("safetensors", ("layout", "dtype"), "transformers, vLLM"),
    Target("gemma-cpp", ("type",), "gemma.cpp .sbs: SFP8 at 8 bits"),
)}


def refuse_flags(to: str, **flags) -> None:
    """Refuse the options of another ``--to`` (given = neither None nor False) instead of ignoring them."""
    for name, value in flags.items():
        if value is not None and value is not False and name not in TARGETS[to].options:
            flag = "--" + name.replace("_", "-")
            owners = " / ".join(f"--to {t.name}" for t in TARGETS.values() if name in t.options)
            raise InputError(f"{flag} is a {owners} option and does not apply to --to {to}; drop it")


def export(checkpoint: str | Path, to: str = "gguf", output: str | Path | None = None, *, force: bool = False,
           dry_run: bool = False, log: Callable[[str], None] | None = print, **options) -> ExportPlanView:
    """Export ``checkpoint`` to ``to`` (``TARGETS``) with its ``options`` (None / False: not given); returns the plan
    (with ``dry_run``, nothing is written). ``output`` None: the target's default place, next to the checkpoint."""
    if to not in TARGETS:
        raise InputError(f"unknown --to {to!r}; choose one of: {', '.join(TARGETS)}")
    refuse_flags(to, **options)
    target = TARGETS[to]
    keyword = dict(target.keywords)
    given = {keyword.get(k, k): v for k, v in options.items() if v is not None and v is not False}
    return target.run(checkpoint, output, force=force, dry_run=dry_run, log=log, **given)
