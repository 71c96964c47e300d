"""The CLI through typer's runner and as the installed console script."""

import json
import shutil
import subprocess

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


@pytest.mark.skipif(shutil.which("gemma3-qat") is None, reason="console script not installed")
def test_console_script_user_errors_are_one_line():
    ok = subprocess.run(["gemma3-qat", "formats"], capture_output=True, text=True)
    assert ok.returncode == 0 and "Q4_0" in ok.stdout
    bad = subprocess.run(["gemma3-qat", "no-such-command"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
