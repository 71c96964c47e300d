"""The CLI through typer's runner and as the installed console script."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemma3_qat import __version__
from gemma3_qat.cli import app

runner = CliRunner()


def test_help_and_version():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "formats" in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"gemma3-qat {__version__}"


def test_formats_lists_bits_and_runtimes():
    result = runner.invoke(app, ["formats", "--json"])
    assert result.exit_code == 0
    rows = {r["format"]: r for r in json.loads(result.output)}
    assert set(rows) == {"int4-block", "int4-channel", "sfp8"}
    assert rows["int4-block"]["bits_per_weight"] == 4.5 and "llama.cpp" in rows["int4-block"]["runs_on"]
    assert rows["sfp8"]["bits_per_weight"] == 8.0 and "gemma.cpp" in rows["sfp8"]["runs_on"]
    assert "vLLM" in rows["int4-channel"]["runs_on"]


def console_script() -> str:
    """The installed entry point: beside this interpreter (a venv run without activation), else on PATH."""
    beside = Path(sys.executable).with_name("gemma3-qat")
    found = str(beside) if beside.exists() else shutil.which("gemma3-qat")
    assert found, "the gemma3-qat console script is not installed: pip install -e ."
    return found


def test_console_script_user_errors_are_one_line():
    script = console_script()
    ok = subprocess.run([script, "formats"], capture_output=True, text=True)
    assert ok.returncode == 0 and "Q4_0" in ok.stdout
    bad = subprocess.run([script, "no-such-command"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
