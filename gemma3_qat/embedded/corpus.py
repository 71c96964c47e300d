"""The embedded model's corpus: the running interpreter's own standard library (sources, docstrings and the
bundled ``pydoc_data`` documentation; PSF licence), split by module into train / validation deterministically.

The standard library differs between Python versions and distributions, so the file list is recorded with
hashes (``stdlib-manifest.json``) and the validation split itself ships with the package: results on it are
comparable anywhere.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

VALIDATION_PERCENT = 5  # of top-level modules, chosen by hash of the module name
_SKIP_TOP = {"site-packages", "dist-packages", "test", "idlelib", "lib2to3", "ensurepip", "turtledemo"}
_SKIP_PARTS = {"test", "tests", "idle_test", "__pycache__", "_bundled"}


@dataclass(frozen=True)
class Document:
    path: str  # relative to the stdlib root, '/'-separated
    text: str

    @property
    def module(self) -> str:
        return self.path.split("/")[0].removesuffix(".py")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(module: str) -> bool:
    return int(hashlib.sha1(module.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """Every standard-library ``.py`` file outside tests and bundled third-party code, sorted by path."""
    root = root or stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in _SKIP_TOP or parts[0].startswith("config-") or _SKIP_PARTS & set(parts[:-1]):
            continue
        if parts[-1].startswith("test_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(rel, text))
    return docs


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    train = [d for d in docs if not is_validation(d.module)]
    valid = [d for d in docs if is_validation(d.module)]
    return train, valid


def manifest(docs: list[Document]) -> dict:
    return {
        "source": "Python standard library of the interpreter that built the model (PSF licence)",
        "python": sys.version.split()[0],
        "validation_rule": f"sha1(top-level module name) % 100 < {VALIDATION_PERCENT}",
        "files": [
            {"path": d.path, "sha256": hashlib.sha256(d.text.encode()).hexdigest(), "bytes": len(d.text.encode()),
             "split": "validation" if is_validation(d.module) else "train"}
            for d in docs
        ],
    }


def write_manifest(docs: list[Document], path: Path) -> None:
    path.write_text(json.dumps(manifest(docs), indent=1) + "\n")
