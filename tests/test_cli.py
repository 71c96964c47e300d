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
    assert set(rows) == {"int4-block", "int4-channel", "sfp8", "q4_k", "q6_k", "q5_0", "q8_0-lattice", "q4_k_m"}
    q4km = rows["q4_k_m"]
    assert q4km["mixture"] and q4km["bits_per_weight_max"] == 8.5 and "Q4_K_M" in q4km["gguf"]
    assert rows["q6_k"]["bits_per_weight"] == 6.5625 and not rows["q6_k"]["mixture"]
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


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def test_export_flag_combinations_and_dry_run_through_the_cli(qat_run, tmp_path):
    """The confirmed bugs of the seams issue, through the CLI: the flags of another --to are refused in one line
    (not ignored), and --dry-run writes nothing whatever the --to, -o included."""
    from gemma3_qat.assets import default_model_path

    run = qat_run(default_model_path(), "sfp8", steps=0)
    before = _tree(run)
    refused = {
        ("--to", "safetensors", "--type", "q8_0", "--lossy"): "--type is a --to gguf / --to gemma-cpp option",
        ("--to", "gguf", "--layout", "compressed-tensors", "--dtype", "bf16"): "--layout is a --to safetensors option",
        ("--to", "gemma-cpp", "--lossy"): "--lossy is a --to gguf option and does not apply to --to gemma-cpp",
        ("--to", "gemma-cpp", "--dtype", "f16"): "--dtype is a --to safetensors option",
        ("--to", "onnx"): "unknown --to 'onnx'",
    }
    for args, message in refused.items():
        result = runner.invoke(app, ["export", str(run), *args, "-o", str(tmp_path / "out")])
        assert result.exit_code != 0 and message in str(result.exception), (args, result.exception)
    for to, out in (("gguf", "m.gguf"), ("safetensors", "st"), ("gemma-cpp", "m.sbs")):
        result = runner.invoke(app, ["export", str(run), "--to", to, "--dry-run", "-o", str(tmp_path / out)])
        assert result.exit_code == 0, (to, result.output, result.exception)
        assert f"would write {tmp_path / out}" in result.output
    assert list(tmp_path.iterdir()) == [] and _tree(run) == before
    result = runner.invoke(app, ["export", str(run), "--to", "gemma-cpp", "--dry-run", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["tensors"][0]["type"] in ("SFP", "BF16", "F32")
