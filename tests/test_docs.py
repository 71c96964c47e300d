"""The user docs stay what a user reads: the README short, the two commands first, every file it links present,
no issue numbers or run circumstances in README or docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
USER_DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_at_most_200_lines():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines: move measurements to docs/results.md, design to docs/design.md"


def test_the_two_commands_come_first():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).split("\n")
    commands = [line.split("#")[0].strip() for line in first_block if line.strip()]
    assert commands == ["make demo", "make test"], commands
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)


def test_every_local_link_and_image_exists():
    missing = []
    for doc in USER_DOCS:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_no_issue_numbers_in_user_docs():
    found = [f"{doc.relative_to(ROOT)}: {m.group(0)}" for doc in USER_DOCS
             for m in re.finditer(r"\b(?:issue|PR)\s*#?\d+|(?<![\w/])#\d{1,4}\b", doc.read_text(), re.I)]
    assert not found, found
