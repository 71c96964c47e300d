"""The one table renderer (gemma3_qat.report): the same text / markdown / csv / json for memory, eval, inspect and
export plans."""

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemma3_qat.cli import app
from gemma3_qat.errors import InputError
from gemma3_qat.evaluate import EvalReport, Result
from gemma3_qat.report import Report, Table, inspect_report, plan_report, render, style_of, to_json

runner = CliRunner()


def test_styles_render_the_same_cells():
    table = Table("t", ["name", "bytes", "ok"], [["a", 1234, True], ["bb", None, False]], ["a note"])
    assert render([table]) == ("t\nname  bytes  ok\n----  -----  ---\na     1,234  yes\nbb           NO\n  a note\n")
    assert render([table], "markdown").splitlines()[2:6] == ["| name | bytes | ok |", "|---|---|---|",
                                                             "| a | 1,234 | yes |", "| bb |  | NO |"]
    assert render([table], "csv").splitlines() == ["# t", "name,bytes,ok", "a,1234,True", "bb,,False"]
    with pytest.raises(InputError, match="unknown output style 'yaml'"):
        render([table], "yaml")
    with pytest.raises(ValueError, match="a row has 2 cells for 3 columns"):
        Table("bad", ["a", "b", "c"], [[1, 2]])


def test_json_and_style_flags():
    @dataclasses.dataclass
    class Thing:
        path: Path
        n: int

        @property
        def twice(self):
            return 2 * self.n

    assert json.loads(to_json(Thing(Path("/x"), 2))) == {"path": "/x", "n": 2, "twice": 4}
    with pytest.raises(TypeError):
        to_json({"x": object()})
    assert json.loads(to_json({"x": complex(1, 2)}, lenient=True)) == {"x": "(1+2j)"}
    assert style_of() == "text" and style_of(as_markdown=True) == "markdown"
    with pytest.raises(InputError, match="choose one of --json / --markdown"):
        style_of(as_json=True, as_markdown=True)


def _eval_report():
    return EvalReport("teacher-dir", "held-out", 4, 256, 12.3456, [
        Result("ptq", "pytorch", "int4-block", 0, 14.2, 0.02, 0.2, 0.9, 1024),
        Result("qat.gguf", "llama.cpp", "int4-block", 100, 12.9, 0.012, 0.1, 0.95, 1024, 0.6, 0.4, "ptq",
               [4.5, 5.669])])


def test_eval_report_uses_the_shared_renderer():
    report = _eval_report()
    assert json.loads(report.to_json()) == dataclasses.asdict(report)  # the JSON it always printed
    md = report.table(markdown=True)
    assert md.startswith("### teacher teacher-dir vs candidates: 4 windows of 256 tokens from held-out")
    assert "| qat.gguf | llama.cpp | int4-block | 100 | 4.50 / 5.67 | 12.900 | 0.01200 | 0.1000 | 95.0% | 60% | 40% |" in md
    assert "| ptq | pytorch | int4-block | 0 | - | 14.200 |" in md
    assert md == report.report().render("markdown")
    text = report.table()
    assert text.splitlines()[2].startswith("---------  ---------")  # the same layout as every command
    assert "teacher    pytorch    -           -      -            12.346" in text
    assert report.table(style="csv").splitlines()[1].startswith("candidate,backend,format,steps,bits/w,ppl")


def test_plan_report_totals_by_type():
    @dataclasses.dataclass
    class Planned:
        gguf_name: str
        ggml_type: str
        shape: tuple
        nbytes: int
        note: str = ""

    report = plan_report("m.gguf", [Planned("a", "Q4_0", (32, 64), 1152), Planned("b", "F32", (64,), 256),
                                    Planned("c", "Q4_0", (64, 64), 2304, "converted")], nbytes=3712, notes=["n"])
    text = report.render()
    assert text.startswith("would write m.gguf (tensor data 0.00 MB: Q4_0 0.00 MB, F32 0.00 MB)")
    assert report.data["bytes_by_type"] == {"Q4_0": 3456, "F32": 256} and "  note: n" in text
    assert report.data["tensors"][2] == {"tensor": "c", "type": "Q4_0", "shape": "[64, 64]", "bytes": 2304,
                                         "note": "converted"}


def test_inspect_has_the_same_styles(tiny_text_dir, tmp_path):
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.gguf_file import inspect_gguf

    export_gguf(tiny_text_dir, tmp_path / "m.gguf", plain_type="f16", log=None)
    info = inspect_gguf(tmp_path / "m.gguf")
    report = inspect_report(info)
    assert isinstance(report, Report) and len(report.tables) == 2
    assert all(len(row[1]) <= 80 and "\n" not in row[1] for row in report.tables[0].rows)  # chat template shortened
    text = runner.invoke(app, ["inspect", str(tmp_path / "m.gguf")]).output
    assert "general.architecture" in text
    assert f"{len(info['tensors'])} tensors, {info['tensor_bytes']:,} bytes" in text
    md = runner.invoke(app, ["inspect", str(tmp_path / "m.gguf"), "--markdown"]).output
    assert md.startswith(f"### {tmp_path / 'm.gguf'}: metadata") and "| token_embd.weight | F16 |" in md
    csv_rows = runner.invoke(app, ["inspect", str(tmp_path / "m.gguf"), "--csv"]).output.splitlines()
    assert csv_rows[1] == "key,value"
    data = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "m.gguf"), "--json"]).output)
    assert data["tensor_bytes"] == info["tensor_bytes"] and data["metadata"]["general.architecture"] == "gemma3"
    result = runner.invoke(app, ["inspect", str(tmp_path / "m.gguf"), "--json", "--csv"])
    assert result.exit_code != 0 and "choose one of" in str(result.exception)
