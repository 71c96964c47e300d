"""Bad and corrupt input through the CLI, as a table: each row is what a new user might pass, and the rule is
the same for all of them (issue 15): exit code 1 (2 for a usage error), exactly one line on stderr starting
with ``error:``, no traceback, and nothing new or changed on disk.

Every row runs in its own workspace (the command's working directory) holding copies of the fixtures it breaks;
the workspace's tree (names, sizes, mtimes) is compared before and after. The rows run in this process through
``gemma3_qat.cli.main`` (the CLI's one error table; fast: torch is imported once), and ``CONSOLE_ROWS`` again,
marked slow, as a subprocess of the installed ``gemma3-qat`` script: what a user sees, import-time noise included.
The rows an ``owner`` other than B names depend on that helper's change (exporter sidecars: C; --resume: D).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_text_dir, qat_run):
    """What the rows copy and break: a trainer-written QAT run (``run``, with its manifest), a plain HF checkpoint
    without one (``plain``), the run's GGUF export (``gguf``)."""
    from gemma3_qat.exporters.gguf import export_gguf

    root = tmp_path_factory.mktemp("bad-input-base")
    run = root / "run"
    shutil.copytree(qat_run(tiny_text_dir, "int4-block"), run, ignore=shutil.ignore_patterns("checkpoints"))
    gguf = root / "model.gguf"
    export_gguf(run, gguf, model_card=False, log=None)
    return {"run": run, "plain": Path(tiny_text_dir), "gguf": gguf, "model": Path(tiny_text_dir)}


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, tiny_text_dir, sample_data):
    """A run directory with two trainer checkpoints (steps 1 and 2), for the ``--resume`` rows (slow)."""
    from gemma3_qat.qat.train import TrainConfig, train

    out = tmp_path_factory.mktemp("bad-input-resume") / "run"
    train(TrainConfig(model=str(tiny_text_dir), format="int4-block", data=[str(sample_data / "text.jsonl")],
                      seq_len=64, batch_size=2, micro_batch_size=2, steps=2, lr=1e-3, warmup_steps=1,
                      eval_every=100, eval_rows=2, save_every=1, output=str(out)), log=lambda *_: None)
    assert len(list((out / "checkpoints").glob("step-*"))) == 2
    return out


# ------------------------------------------------------------------------------------------------- setups


def cut(path: Path, n: int) -> None:
    """Remove the last ``n`` bytes (a torn copy)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - n])


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rows(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


GOOD = [{"text": f"def f{i}(x):\n    return x + {i}\n" * 4} for i in range(12)]


GGUF_FIRST_KEY_LENGTH = 4 + 4 + 8 + 8  # byte offset of the first key's length: after magic, version and counts


def safetensors_header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# ------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # relative paths resolve in the workspace (the command's working directory)
    setup: Callable[[Path, dict], None] | None = None  # (workspace, fixture paths): makes the bad input
    expect: tuple[str, ...] = ()  # substrings of the one error line (the file, the line number, the fix ...)
    code: int = 1
    slow: bool = False  # needs the slow ``resumable`` fixture or a model load
    owner: str = ""  # the helper whose change makes it pass (while that lands, it may fail)


def data_case(id, name, content, *expect):
    return Case(id, ("train", "--model", "{model}", "--data", name, "--steps", "0", "--seq-len", "32", "-o", "out"),
                lambda ws, b: write(ws / name, content), (name, *expect))


def run_copy(mutate: Callable[[Path], None] | None = None, *, manifest: bool = True):
    def setup(ws: Path, b: dict) -> None:
        run = copy(b["run"], ws / "run")
        if not manifest:
            (run / "manifest.json").unlink()
        if mutate:
            mutate(run)
    return setup


def plain_copy(mutate: Callable[[Path], None]):
    def setup(ws: Path, b: dict) -> None:
        mutate(copy(b["plain"], ws / "plain"))
    return setup


def gguf_copy(mutate: Callable[[Path], None] | None = None, name: str = "m.gguf"):
    def setup(ws: Path, b: dict) -> None:
        path = copy(b["gguf"], ws / name)
        if mutate:
            mutate(path)
    return setup


def resume_setup(mutate: Callable[[Path], None]):
    def setup(ws: Path, b: dict) -> None:
        mutate(copy(b["resumable"], ws / "run"))
    return setup


def both_checkpoints(mutate: Callable[[Path], None]):
    def apply(run: Path) -> None:
        for ckpt in sorted((run / "checkpoints").glob("step-*")):
            mutate(ckpt)
    return apply


EXPORT = ("export", "--to", "gguf")
TRAIN_RESUME = ("train", "--model", "{model}", "--format", "int4-block", "--seq-len", "64", "--batch-size", "2",
                "--micro-batch-size", "2", "--steps", "2", "--resume", "-o", "run")

CASES = [
    # ---- train: data files (the data is read before any model is loaded)
    data_case("data-malformed-json-line", "bad.jsonl", rows(*GOOD[:5], '{"text": "oops"', *GOOD[5:]),
              "line 6", "not valid JSON"),
    Case("data-malformed-default-output", ("train", "--model", "{model}", "--data", "bad.jsonl", "--steps", "0"),
         lambda ws, b: write(ws / "bad.jsonl", rows(*GOOD[:2], "{")), ("bad.jsonl line 3",)),  # no runs/ left
    data_case("data-malformed-after-blank-lines", "bad.jsonl", rows(*GOOD[:3], "", "", '{"text": 1,}', *GOOD[3:]),
              "line 6", "not valid JSON"),
    data_case("data-messages-is-a-string", "chat.jsonl", rows(*[{"messages": "hello"}] * 6),
              "line 1", "'messages' is a string", "list of {role, content}"),
    data_case("data-messages-string-after-lists", "chat.jsonl",
              rows(*[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4,
                   {"messages": "hello"}), "line 5", "'messages' is a string"),
    data_case("data-message-without-role", "chat.jsonl", rows(*[{"messages": [{"content": "hi"}]}] * 4),
              "line 1", "'role'"),
    data_case("data-content-is-a-number", "chat.jsonl", rows(*[{"messages": [{"role": "user", "content": 3}]}] * 4),
              "line 1", "'content' is a number", "expected a string"),
    data_case("data-text-is-a-number", "num.jsonl", rows(*[{"text": i} for i in range(6)]),
              "line 1", "'text' is a number", "expected a string"),
    data_case("data-text-number-after-strings", "num.jsonl", rows(*GOOD[:4], "", {"text": 7}, *GOOD[4:]),
              "line 6", "'text' is a number"),
    data_case("data-row-without-text-or-messages", "mixed.jsonl", rows(*GOOD[:3], {"other": 1}, *GOOD[3:]),
              "line 4", "no 'text' and no 'messages'"),
    data_case("data-line-not-an-object", "list.jsonl", rows(*GOOD[:2], "[1, 2]", *GOOD[2:]), "line 3",
              "not an object"),
    data_case("data-json-array-bad-row", "rows.json", json.dumps(GOOD[:3] + [{"text": 7}]), "row 4",
              "'text' is a number"),
    data_case("data-no-text-field", "prompts.jsonl", rows(*[{"prompt": "x"}] * 4), "no 'text' or 'messages'"),
    data_case("data-empty-file", "empty.jsonl", "", "is empty"),
    data_case("data-unsupported-suffix", "data.csv", "text\nhello\n", "unsupported data file type"),
    Case("data-not-utf8", ("train", "--model", "{model}", "--data", "latin1.jsonl", "--steps", "0", "--seq-len", "32",
                           "-o", "out"),
         lambda ws, b: (ws / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n' * 4), ("latin1.jsonl", "UTF-8")),
    Case("data-missing-file", ("train", "--model", "{model}", "--data", "nope.jsonl", "--steps", "0", "-o", "out"),
         expect=("nope.jsonl", "does not exist")),
    Case("data-directory", ("train", "--model", "{model}", "--data", "d", "--steps", "0", "-o", "out"),
         lambda ws, b: (ws / "d").mkdir(), ("is a directory",)),
    Case("data-bad-weight", ("train", "--model", "{model}", "--data", "a.jsonl:-1", "--steps", "0", "-o", "out"),
         expect=("must be positive",)),
    Case("teacher-cache-malformed-json", ("teacher-cache", "--model", "{model}", "--data", "bad.jsonl", "--seq-len",
                                          "32", "-o", "cache"),
         lambda ws, b: write(ws / "bad.jsonl", rows(*GOOD[:2], '{"text": "x"', *GOOD[2:])),
         ("bad.jsonl line 3", "not valid JSON")),
    Case("eval-data-text-is-a-number", ("eval", "run", "--data", "num.jsonl"),
         lambda ws, b: (run_copy()(ws, b), write(ws / "num.jsonl", rows(*GOOD[:3], {"text": 5}))),
         ("num.jsonl line 4", "'text' is a number")),
    # ---- train: model, format, output
    Case("train-unknown-format", ("train", "--model", "{model}", "--format", "int5", "--steps", "0", "-o", "out"),
         expect=("int5",)),
    Case("train-model-missing", ("train", "--model", "no/such/dir/x", "--steps", "0", "-o", "out"),
         expect=("does not exist",)),
    Case("train-model-without-config", ("train", "--model", "empty", "--steps", "0", "-o", "out"),
         lambda ws, b: (ws / "empty").mkdir(), ("no config.json",)),
    Case("train-model-weights-torn", ("train", "--model", "plain", "--steps", "0", "--seq-len", "32", "-o", "out"),
         plain_copy(lambda p: cut(p / "model.safetensors", 1024)), ("model.safetensors", "truncated: header says")),
    Case("train-output-holds-a-run", ("train", "--model", "{model}", "--steps", "0", "-o", "run"), run_copy(),
         ("already holds a training run", "--force")),
    Case("train-unknown-option", ("train", "--no-such-option"), code=2, expect=("No such option",)),
    Case("resume-nothing-to-resume", ("train", "--model", "{model}", "--steps", "0", "--resume", "-o", "fresh"),
         expect=("nothing to resume",)),
    # ---- export: torn, bit-flipped or malformed checkpoints are refused before a byte is read into the GGUF
    Case("export-weights-cut-1k", (*EXPORT, "run", "-o", "out.gguf"), run_copy(lambda r: cut(r / "model.safetensors",
         1024)), ("model.safetensors", "manifest says")),
    Case("export-weights-cut-1k-no-manifest", (*EXPORT, "run", "-o", "out.gguf"),
         run_copy(lambda r: cut(r / "model.safetensors", 1024), manifest=False),
         ("model.safetensors", "truncated: header says", "bytes of tensor data")),
    Case("export-weights-cut-1m-no-manifest", (*EXPORT, "run", "-o", "out.gguf"),
         run_copy(lambda r: cut(r / "model.safetensors", 1 << 20), manifest=False), ("truncated",)),
    Case("export-weights-bit-flip", (*EXPORT, "run", "-o", "out.gguf"),
         run_copy(lambda r: flip(r / "model.safetensors", safetensors_header_end(r / "model.safetensors") + 4096)),
         ("model.safetensors", "SHA-256")),
    Case("export-safetensors-weights-cut", ("export", "--to", "safetensors", "run", "-o", "st"),
         run_copy(lambda r: cut(r / "model.safetensors", 1024)), ("model.safetensors",)),
    Case("export-header-length-garbage", (*EXPORT, "plain", "--type", "f16", "-o", "out.gguf"),
         plain_copy(lambda p: flip(p / "model.safetensors", 5)), ("model.safetensors", "header length says")),
    Case("export-header-offsets-flipped", (*EXPORT, "plain", "--type", "f16", "-o", "out.gguf"),
         plain_copy(lambda p: (p / "model.safetensors").write_bytes(
             (p / "model.safetensors").read_bytes().replace(b'"data_offsets":[0,', b'"data_offsets":[8,', 1))),
         ("model.safetensors", "data_offsets")),
    Case("export-header-not-json", (*EXPORT, "plain", "--type", "f16", "-o", "out.gguf"),
         plain_copy(lambda p: flip(p / "model.safetensors", 9)), ("model.safetensors", "not valid UTF-8 JSON")),
    Case("export-missing-shard", (*EXPORT, "plain", "--type", "f16", "-o", "out.gguf"),
         plain_copy(lambda p: write(p / "model.safetensors.index.json", json.dumps({"weight_map": {
             "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))),
         ("model-00002-of-00002", "missing")),
    Case("export-config-not-json", (*EXPORT, "plain", "--type", "f16", "-o", "out.gguf"),
         plain_copy(lambda p: write(p / "config.json", '{"model_type": "gemma3_text",')), ("config.json", "JSON")),
    Case("export-qat-json-not-json", (*EXPORT, "run", "-o", "out.gguf"),
         run_copy(lambda r: write(r / "qat.json", "{format: int4-block}"), manifest=False), ("qat.json", "JSON")),
    Case("export-missing-checkpoint", (*EXPORT, "nope", "-o", "out.gguf"), expect=("nope", "does not exist")),
    Case("export-not-a-checkpoint", (*EXPORT, "d", "-o", "out.gguf"), lambda ws, b: (ws / "d").mkdir(),
         ("no config.json",)),
    Case("export-checkpoint-is-a-file", (*EXPORT, "f.txt", "-o", "out.gguf"), lambda ws, b: write(ws / "f.txt", "x"),
         ("f.txt",)),
    Case("export-unknown-to", ("export", "--to", "onnx", "run"), run_copy(), ("onnx",)),
    Case("export-output-exists", (*EXPORT, "run", "-o", "out.gguf"),
         lambda ws, b: (run_copy()(ws, b), write(ws / "out.gguf", "mine")),
         ("out.gguf", "already exists", "--force")),
    Case("export-output-is-a-directory-force", (*EXPORT, "run", "-o", "outdir", "--force"),
         lambda ws, b: (run_copy()(ws, b), write(ws / "outdir" / "keep.txt", "mine")), ("outdir",), owner="C"),
    Case("export-sidecar-exists", (*EXPORT, "run", "-o", "notes.gguf"),
         lambda ws, b: (run_copy()(ws, b), write(ws / "notes.md", "my notes")), ("notes.md", "--force"), owner="C"),
    Case("export-missing-parent", (*EXPORT, "run", "-o", "no/such/parent/x.gguf"), run_copy(),
         ("no/such/parent",), owner="C"),
    # ---- inspect and memory --measure: GGUF files checked before the gguf package maps them
    Case("inspect-directory", ("inspect", "d"), lambda ws, b: (ws / "d").mkdir(), ("is a directory",)),
    Case("inspect-missing", ("inspect", "nope.gguf"), expect=("nope.gguf", "does not exist")),
    Case("inspect-empty", ("inspect", "m.gguf"), lambda ws, b: write(ws / "m.gguf", ""), ("m.gguf", "empty")),
    Case("inspect-not-gguf", ("inspect", "m.gguf"), lambda ws, b: write(ws / "m.gguf", "hello world\n"),
         ("not a GGUF file",)),
    Case("inspect-cut-1", ("inspect", "m.gguf"), gguf_copy(lambda p: cut(p, 1)),
         ("truncated: header says", "bytes of tensor data, the file has")),
    Case("inspect-cut-1k", ("inspect", "m.gguf"), gguf_copy(lambda p: cut(p, 1024)), ("truncated: header says",)),
    Case("inspect-cut-into-header", ("inspect", "m.gguf"),
         gguf_copy(lambda p: p.write_bytes(p.read_bytes()[:3000])), ("truncated",)),
    Case("inspect-header-byte-flipped", ("inspect", "m.gguf"),
         gguf_copy(lambda p: flip(p, GGUF_FIRST_KEY_LENGTH + 3)), ("m.gguf",)),
    Case("inspect-version-flipped", ("inspect", "m.gguf"), gguf_copy(lambda p: flip(p, 4, 0x40)), ("version",)),
    Case("memory-measure-cut", ("memory", "--measure", "m.gguf"), gguf_copy(lambda p: cut(p, 1024)),
         ("truncated: header says",)),
    Case("memory-measure-header-flipped", ("memory", "--measure", "m.gguf"),
         gguf_copy(lambda p: flip(p, GGUF_FIRST_KEY_LENGTH + 3)), ("m.gguf",)),
    Case("memory-measure-empty", ("memory", "--measure", "m.gguf"), lambda ws, b: write(ws / "m.gguf", ""),
         ("empty",)),
    # ---- eval: candidates validated before the teacher runs
    Case("eval-missing-candidate", ("eval", "nope.gguf"), expect=("nope.gguf", "does not exist")),
    Case("eval-gguf-cut", ("eval", "m.gguf"), gguf_copy(lambda p: cut(p, 1024)), ("truncated: header says",)),
    Case("eval-run-weights-cut", ("eval", "run"), run_copy(lambda r: cut(r / "model.safetensors", 1024)),
         ("model.safetensors", "manifest says")),
    # ---- --resume of a run whose checkpoints are all damaged: refused, naming each (helper D's fallback)
    Case("resume-all-checkpoints-torn", TRAIN_RESUME,
         resume_setup(both_checkpoints(lambda c: cut(c / "model.safetensors", 1024))),
         ("nothing to resume", "step-000001", "step-000002"), slow=True, owner="D"),
    Case("resume-trainer-state-corrupt", TRAIN_RESUME,
         resume_setup(both_checkpoints(lambda c: write(c / "trainer" / "trainer_state.json", '{step: 2'))),
         ("nothing to resume", "trainer_state.json"), slow=True, owner="D"),
]


# ------------------------------------------------------------------------------------------------- running


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with (kind, size, mtime): what "nothing new or changed on disk" compares."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[path.relative_to(root).as_posix()] = ("dir", 0, 0) if path.is_dir() else ("file", st.st_size,
                                                                                     st.st_mtime_ns)
    return out


def console_script() -> list[str]:
    beside = Path(sys.executable).with_name("gemma3-qat")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "gemma3_qat.cli"]


def run_cli(args: list[str], cwd: Path, *, subprocess_: bool, env: dict[str, str], monkeypatch, capfd):
    """(exit code, stderr) of ``gemma3-qat ARGS`` run in ``cwd``."""
    if subprocess_:
        proc = subprocess.run([*console_script(), *args], cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=600)
        return proc.returncode, proc.stderr
    from gemma3_qat.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["gemma3-qat", *args])
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capfd.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, capfd.readouterr().err


def check_case(case: Case, tmp_path: Path, request, monkeypatch, capfd, *, subprocess_: bool) -> None:
    fixtures = dict(request.getfixturevalue("base"))
    if case.slow and "--resume" in case.args:
        fixtures["resumable"] = request.getfixturevalue("resumable")
    ws = tmp_path / "ws"
    ws.mkdir()
    if case.setup:
        case.setup(ws, fixtures)
    args = [a.format(**{k: str(v) for k, v in fixtures.items()}) for a in case.args]
    before = snapshot(ws)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "GEMMA3_QAT_DEBUG": ""}
    code, err = run_cli(args, ws, subprocess_=subprocess_, env=env, monkeypatch=monkeypatch, capfd=capfd)
    lines = err.strip().splitlines()
    print(f"{case.id} [exit {code}]: {err.strip()}")  # shown with pytest -rP: the messages side by side
    where = f"gemma3-qat {' '.join(args)} (owner {case.owner or 'B'}) wrote to stderr:\n{err}"
    assert "Traceback" not in err, where
    assert code == case.code, where
    if case.code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), where
        assert "internal error" not in err, where
    for text in case.expect:
        assert text in err, f"{text!r} missing; {where}"
    after = snapshot(ws)
    assert {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)} == set(), where


# Rows that run again as the installed script (slow: ~8 s each, mostly imports): one or more of every command and
# kind of failure, for what only a real process shows (import-time and progress-bar noise on stderr).
CONSOLE_ROWS = ("data-malformed-json-line", "data-messages-is-a-string", "data-text-is-a-number", "data-not-utf8",
                "train-unknown-option", "export-weights-cut-1k", "export-weights-cut-1k-no-manifest",
                "export-header-not-json", "export-output-is-a-directory-force", "export-sidecar-exists",
                "export-missing-parent", "inspect-directory", "inspect-cut-1k", "inspect-header-byte-flipped",
                "memory-measure-cut", "eval-gguf-cut", "resume-all-checkpoints-torn", "resume-trainer-state-corrupt")


def _params(subprocess_: bool):
    out = []
    for case in CASES:
        if subprocess_ and case.id not in CONSOLE_ROWS:
            continue
        marks = [pytest.mark.slow] if (case.slow or subprocess_) else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _params(False))
def test_bad_input(case, tmp_path, request, monkeypatch, capfd):
    check_case(case, tmp_path, request, monkeypatch, capfd, subprocess_=False)


@pytest.mark.parametrize("case", _params(True))
def test_bad_input_console_script(case, tmp_path, request, monkeypatch, capfd):
    check_case(case, tmp_path, request, monkeypatch, capfd, subprocess_=True)


def test_debug_variable_shows_the_traceback(tmp_path, base):
    """With GEMMA3_QAT_DEBUG=1 the same corrupt-file error keeps its traceback (for a bug report)."""
    bad = copy(base["gguf"], tmp_path / "m.gguf")
    cut(bad, 1024)
    env = {**os.environ, "GEMMA3_QAT_DEBUG": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*console_script(), "inspect", str(bad)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CorruptFileError" in proc.stderr and "truncated" in proc.stderr


def test_the_table_covers_every_command():
    """The table covers the issue's list: each command it names has rows, and ids are unique."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and set(CONSOLE_ROWS) <= set(ids)
    for command in ("train", "export", "eval", "inspect", "memory"):
        assert any(c.args[0] == command for c in CASES), command
    assert any("--resume" in c.args for c in CASES)


# ------------------------------------------------------------------------------------------------- the readers


def test_manifest_records_and_verifies_every_file(tmp_path):
    from gemma3_qat.integrity import MANIFEST, read_manifest, verify_manifest, write_manifest
    from gemma3_qat.errors import CorruptFileError

    verify_manifest(tmp_path)  # no manifest (a user's HF checkpoint): nothing to check
    write(tmp_path / "model.safetensors", "weights" * 100)
    write(tmp_path / "trainer" / "optimizer.bin", "state")
    write_manifest(tmp_path)
    files = read_manifest(tmp_path)
    assert set(files) == {"model.safetensors", "trainer/optimizer.bin"} and MANIFEST not in files
    assert files["model.safetensors"]["bytes"] == 700
    verify_manifest(tmp_path)
    flip(tmp_path / "trainer" / "optimizer.bin", 0, 1)  # same size, other bytes
    verify_manifest(tmp_path, files=["model.safetensors"])  # only the named files are hashed
    with pytest.raises(CorruptFileError, match="optimizer.bin: SHA-256 differs"):
        verify_manifest(tmp_path)
    cut(tmp_path / "model.safetensors", 1)
    with pytest.raises(CorruptFileError, match="model.safetensors: 699 bytes, manifest says 700"):
        verify_manifest(tmp_path, files=())  # sizes are always checked
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="missing but the manifest lists it"):
        verify_manifest(tmp_path, files=())
    write(tmp_path / MANIFEST, '{"files": [1]}')
    with pytest.raises(CorruptFileError, match="not a valid manifest"):
        verify_manifest(tmp_path)


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"format": "pt"}}, bytes(8), None),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(6), "header says 8 bytes of tensor data"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(9), "1 bytes no tensor accounts for"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "needs 12"),
    ({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), "begin <= end"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "needs dtype, shape and data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "overlap"),
    ({"__metadata__": {"n": 1}}, b"", "__metadata__"),
])
def test_safetensors_header_follows_the_spec(tmp_path, header, data, match):
    from gemma3_qat.integrity import safetensors_header
    from gemma3_qat.errors import CorruptFileError

    path = _safetensors(tmp_path / "m.safetensors", header, data)
    if match is None:
        assert safetensors_header(path)[0] == header
    else:
        with pytest.raises(CorruptFileError, match=match):
            safetensors_header(path)


def test_safetensors_header_agrees_with_the_safetensors_library(tmp_path, tiny_text_dir):
    """A real file passes; every cut of it (the first bytes, the header, the data) is refused."""
    from safetensors.torch import load_file

    from gemma3_qat.checkpoint import Checkpoint
    from gemma3_qat.errors import CorruptFileError
    from gemma3_qat.integrity import safetensors_header

    src = Path(tiny_text_dir) / "model.safetensors"
    header, start = safetensors_header(src)
    assert set(load_file(src)) == set(header) - {"__metadata__"}
    ckpt = Checkpoint(tiny_text_dir)
    name = ckpt.names()[0]
    assert ckpt.read(name).equal(load_file(src)[name])
    path = tmp_path / "m.safetensors"
    for keep in (0, 7, 8, start - 1, start, start + 1, src.stat().st_size - 1):
        path.write_bytes(src.read_bytes()[:keep])
        with pytest.raises(CorruptFileError, match=str(path)):
            safetensors_header(path)


def test_gguf_every_header_byte_flip_is_one_line_or_readable(tmp_path, base):
    """A flipped byte anywhere in a GGUF header is either a CorruptFileError or a file inspect reads fully."""
    import random

    from gemma3_qat.errors import CorruptFileError
    from gemma3_qat.gguf_file import inspect_gguf
    from gemma3_qat.gguf_file import open_gguf

    good = base["gguf"].read_bytes()
    header_end = open_gguf(base["gguf"]).data_offset
    rng = random.Random(0)
    path = tmp_path / "m.gguf"
    refused = 0
    for pos in [*range(0, 64), *rng.sample(range(64, header_end), 100)]:
        bad = bytearray(good)
        bad[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        try:
            inspect_gguf(path)
        except CorruptFileError as e:
            assert str(path) in str(e)
            refused += 1
    assert refused > 20  # lengths, counts, types and offsets are checked, not just the magic
    for keep in (0, 3, 4, 23, 24, 100, header_end - 1, header_end, len(good) - 1):
        path.write_bytes(good[:keep])
        with pytest.raises(CorruptFileError):
            open_gguf(path)
