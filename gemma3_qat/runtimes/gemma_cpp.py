"""gemma.cpp in the loop: its binaries, per-position logits of token windows, greedy text, and ``.sbs`` inspection.

The binaries are gemma.cpp 3ed403e built static for x86-64-v3 (``shared/gemma-cpp/README.md``): ``nll_probe``
(teacher-forced logits on explicit ids), ``gemma`` (the runner), ``migrate_weights`` (gemma.cpp's own writer,
a format oracle). They are found in ``$GEMMA_CPP_BIN``, else in ``../shared/gemma-cpp/bin`` beside the
repository, else on ``PATH``. Every call passes ``--num_threads N --spin 0 --pin 0``: spinning or pinned worker
threads starve everything else on a shared machine.

One trap shapes ``window_logits``: gemma.cpp stops generating at an end-of-sequence id, even a forced one, and
cannot start from a prompt that ends in one, so the logits after ``<eos>`` or ``<end_of_turn>`` inside a packed
window would be lost. The file's ``config`` blob is where gemma.cpp reads those ids from: a window holding one
is run on a temporary copy whose eos ids are set to -1 (no token), everything else byte-identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gemma3_qat.errors import InputError, MissingFileError
from gemma3_qat.exporters.sbs import ELEMENT_BYTES, expected_shapes, read_sbs

ENV_VAR = "GEMMA_CPP_BIN"
BINARIES = ("gemma", "nll_probe", "single_benchmark", "migrate_weights")
CPU_FLAGS = ("avx2", "fma", "f16c")  # x86-64-v3, what the shared binaries were built for
THREADS = 2


class GemmaCppRuntimeError(InputError):
    """gemma.cpp is missing, cannot run on this CPU, or refused a file (its message is quoted)."""


def default_bin_dir() -> Path:
    """``../shared/gemma-cpp/bin`` beside the repository this package is in."""
    return Path(__file__).resolve().parents[3] / "shared" / "gemma-cpp" / "bin"


def missing_cpu_flags() -> list[str]:
    """The x86-64-v3 flags this CPU lacks (empty: the binaries run)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return list(CPU_FLAGS)
    return [f for f in CPU_FLAGS if f not in flags]


def binary(name: str) -> Path:
    """The path of a gemma.cpp binary; a one-line error naming where it was looked for and the fix."""
    places = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    places.append(default_bin_dir())
    for d in places:
        if (d / name).is_file():
            path = d / name
            break
    else:
        found = shutil.which(name)
        if not found:
            raise MissingFileError(f"gemma.cpp's {name} not found in {', '.join(map(str, places))} or on PATH; set "
                                   f"{ENV_VAR} to the directory holding the gemma.cpp binaries")
        path = Path(found)
    lacking = missing_cpu_flags()
    if lacking:
        raise GemmaCppRuntimeError(f"this CPU lacks {', '.join(lacking)}, which the gemma.cpp binaries need "
                                   "(x86-64-v3); run them on an AVX2 machine")
    return path


def _run(args: list[str], what: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args + ["--num_threads", str(THREADS), "--spin", "0", "--pin", "0"],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Abort" in ln or "rror" in ln), lines[-1] if lines else "")
        raise GemmaCppRuntimeError(f"gemma.cpp's {what} failed (exit {proc.returncode}): {reason.strip()[:300]}")
    return proc


# ------------------------------------------------------------------------------------------------- logits


@contextmanager
def _without_eos(path: Path) -> Iterator[Path]:
    """A temporary copy of ``path`` whose config says eos_id = secondary_eos_id = -1 (see the module doc)."""
    sbs = read_sbs(path)
    off, _ = sbs.blobs["config"]
    word = sbs.config["eos_word"]
    try:  # beside the file (same filesystem: a fast copy), else in the temporary directory (a read-only place)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".noeos.sbs", dir=path.parent)
    except OSError:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".noeos.sbs")
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        with open(tmp, "r+b") as f:
            f.seek(off + 4 * word)
            f.write(b"\xff" * 8)
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _probe(path: Path, ids: list[int], prefill: int, vocab: int) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="gemma3-qat-nll-") as d:
        ids_file, out = Path(d) / "ids.txt", Path(d) / "logits.f32"
        ids_file.write_text(" ".join(map(str, ids)) + "\n")
        _run([str(binary("nll_probe")), "--weights", str(path), "--ids", str(ids_file), "--prefill", str(prefill),
              "--logits_out", str(out)], "nll_probe")
        logits = np.fromfile(out, dtype=np.float32)
    if logits.size != len(ids) * vocab:
        raise GemmaCppRuntimeError(f"nll_probe wrote {logits.size} logits, expected {len(ids)} x {vocab}")
    return logits.reshape(len(ids), vocab)


def window_logits(path: str | Path, windows: Iterable[list[int]], *, prefill: int = 1) -> Iterator[np.ndarray]:
    """Per window of token ids, gemma.cpp's logits in transformers' convention: row ``i`` is the distribution of
    the token after ``ids[:i + 1]``, ``[len(ids), vocab]`` f32. The first ``prefill`` ids are a prompt run in
    one batch (its rows, except the last, are NaN: gemma.cpp records no logits there); every later id is forced
    one at a time (decode). ``prefill = 1`` gives every row."""
    path = Path(path)
    sbs = read_sbs(path)
    vocab, eos = sbs.config["vocab_size"], {sbs.config["eos_id"], sbs.config["secondary_eos_id"]}
    windows = [list(map(int, w)) for w in windows]
    if not 1 <= prefill:
        raise InputError(f"prefill must be at least 1 (BOS), got {prefill}")
    if any(prefill >= len(w) + 1 for w in windows):
        raise InputError(f"prefill {prefill} leaves nothing to decode in a window")
    with (_without_eos(path) if any(eos & set(w) for w in windows) else _same(path)) as run_path:
        for ids in windows:
            # one extra (dummy) id so that the logits after the window's last id are recorded too
            dump = _probe(run_path, ids + [0], prefill, vocab)
            out = np.full((len(ids), vocab), np.nan, dtype=np.float32)
            out[prefill - 1:] = dump[prefill:]
            yield out


@contextmanager
def _same(path: Path) -> Iterator[Path]:
    yield path


def gemma_cpp_logits(path: str | Path, windows, tokenizer=None) -> Iterator:
    """The evaluate backend (like ``evaluate.llama_cpp_logits``): torch logits ``[seq_len, vocab]`` per window of
    ``windows`` (``[N, seq_len]`` ids), decoded token by token in gemma.cpp. With ``tokenizer`` (the reference's
    transformers tokenizer), the file's embedded SentencePiece model must tokenize a probe text identically."""
    import torch

    if tokenizer is not None:
        check_tokenizer(path, tokenizer)
    for logits in window_logits(path, [w.tolist() for w in windows]):
        yield torch.from_numpy(logits)


TOKENIZER_PROBE = "def f(x):\n    return x ** 2  # squares\t\n\n12345 67.8 é ü 中文 日本語  x   y\n"


def check_tokenizer(path: str | Path, tokenizer) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=read_sbs(path).read_blob("tokenizer"))
    ours = tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids
    theirs = sp.encode(TOKENIZER_PROBE)
    if ours != theirs:
        raise GemmaCppRuntimeError(f"{Path(path).name}: its tokenizer differs from the reference's; evaluate it "
                                   "against the checkpoint it was exported from")


def generate(path: str | Path, prompt: str, *, max_tokens: int = 16, timeout: float = 300) -> str:
    """gemma.cpp's greedy continuation of ``prompt`` (the runner strips the first token's leading spaces)."""
    proc = _run([str(binary("gemma")), "--weights", str(path), "--prompt", prompt, "--max_generated_tokens",
                 str(max_tokens), "--temperature", "0", "--verbosity", "0"], "gemma runner", timeout)
    return proc.stdout


def migrate(path: str | Path, output: str | Path) -> None:
    """Re-save ``path`` through gemma.cpp's own writer (``migrate_weights``): the format oracle."""
    _run([str(binary("migrate_weights")), "--weights", str(path), "--output_weights", str(output)],
         "migrate_weights")


# ------------------------------------------------------------------------------------------------- inspect


def sbs_provenance(path: str | Path) -> tuple[str, int | None]:
    """(format, steps) of a ``.sbs`` we wrote (evaluate's report rows, like ``_gguf_provenance``); validated
    first, so a torn file is one line naming it before gemma.cpp sees it."""
    from gemma3_qat.exporters.gemma_cpp import provenance

    return provenance(read_sbs(path).config.get("display_name", ""))


def inspect_sbs(path: str | Path) -> dict:
    """Config, tensor table and totals of a ``.sbs`` file (validated first, as gemma.cpp's reader does)."""
    sbs = read_sbs(path)
    config = {k: v for k, v in sbs.config.items() if k != "eos_word"}
    if config.get("layer_configs"):
        first = config["layer_configs"][0]
        same = all(c == first for c in config["layer_configs"])
        config["layer_configs"] = (f"{len(config['layer_configs'])} x {first}" if same
                                   else config["layer_configs"])
    tensors = [{"name": r["name"], "type": r["type"], "shape": [r["rows"], r["cols"]],
                "bytes": sbs.blobs[r["name"]][1], "scale": r["scale"]} for r in sbs.toc]
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t["type"]] = by_type.get(t["type"], 0) + t["bytes"]
    tensor_bytes = sum(t["bytes"] for t in tensors)
    meta = {name: size for name, (_, size) in sbs.blobs.items() if name in ("config", "tokenizer", "toc")}
    return {"path": str(path), "file_bytes": sbs.file_bytes, "metadata": config, "tensors": tensors,
            "tensor_bytes": tensor_bytes, "bytes_by_type": by_type, "metadata_bytes": meta,
            "padding_and_directory_bytes": sbs.file_bytes - tensor_bytes - sum(meta.values())}


def measure_sbs(path: str | Path) -> dict:
    """Exact bytes of a ``.sbs`` file, tensor by tensor, checked against its own config as gemma.cpp's loader
    checks them: each tensor's shape against the one the config implies, and each blob's size against
    ``rows x cols x element bytes``. ``mismatches`` lists what differs (empty for a file gemma.cpp loads)."""
    info = inspect_sbs(path)
    expected = expected_shapes(read_sbs(path).config)
    mismatches = []
    for t in info["tensors"]:
        want = expected.get(t["name"])
        if want is None:
            mismatches.append(f"{t['name']}: not a tensor of this config")
        elif tuple(t["shape"]) != want:
            mismatches.append(f"{t['name']}: shape {t['shape']}, the config implies {list(want)}")
        if t["bytes"] != t["shape"][0] * t["shape"][1] * ELEMENT_BYTES.get(t["type"], 0):
            mismatches.append(f"{t['name']}: {t['bytes']} bytes for {t['shape']} x {t['type']}")
    missing = sorted(set(expected) - {t["name"] for t in info["tensors"]})
    mismatches += [f"{name}: missing" for name in missing]
    return {"path": info["path"], "file_bytes": info["file_bytes"], "tensor_bytes": info["tensor_bytes"],
            "bytes_by_type": info["bytes_by_type"], "metadata_bytes": info["metadata_bytes"],
            "padding_and_directory_bytes": info["padding_and_directory_bytes"],
            "tensors": [{"name": t["name"], "type": t["type"], "bytes": t["bytes"]} for t in info["tensors"]],
            "mismatches": mismatches, "exact": not mismatches}
