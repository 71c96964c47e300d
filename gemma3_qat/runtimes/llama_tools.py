"""llama.cpp's own quantization tools: the post-training baselines users download, made the way they are made.

``convert_hf_to_gguf.py`` (llama.cpp's HF-to-GGUF converter, with its own gguf-py), ``llama-imatrix`` (the importance matrix: per-column mean squared activations of every matmul, over calibration
text), ``llama-quantize`` (RTN / imatrix-weighted Q4_0, the K-quants, IQ4_NL; the quantizer of every community
GGUF) and ``llama-perplexity --kl-divergence``, built from the llama.cpp that our llama-cpp-python wheel vendors
by ``scripts/build_llama_tools.sh`` (``scripts/install.sh --test`` runs it). They are found in
``$LLAMA_TOOLS_DIR``, else in the newest ``.wheelhouse/llama-tools-*/bin`` of the repository. Every call is
``subprocess.run`` with its output captured; a failure quotes llama.cpp's last line.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gemma3_qat.errors import InputError, MissingFileError

ENV_VAR = "LLAMA_TOOLS_DIR"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
THREADS = 2


class LlamaToolError(InputError):
    """A llama.cpp tool is missing or failed (its last line is quoted)."""


def tools_dir() -> Path:
    """The directory holding ``bin/llama-quantize`` etc.; a one-line error with the fix when there is none."""
    if os.environ.get(ENV_VAR):
        d = Path(os.environ[ENV_VAR])
        if (d / "bin" / "llama-quantize").is_file():
            return d
        raise MissingFileError(f"${ENV_VAR}={d} has no bin/llama-quantize; run scripts/build_llama_tools.sh")
    repo = Path(__file__).resolve().parents[2]
    found = sorted((repo / ".wheelhouse").glob("llama-tools-*/bin/llama-quantize"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise MissingFileError("llama.cpp's tools are not built: run scripts/build_llama_tools.sh (about 6 minutes)"
                               f" or set ${ENV_VAR}")
    return found[-1].parents[1]


def available() -> bool:
    try:
        tools_dir()
    except MissingFileError:
        return False
    return True


def _run(tool: str, *args, timeout: float = 3600) -> str:
    cmd = [str(tools_dir() / "bin" / tool), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise LlamaToolError(f"{tool} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    return proc.stdout + proc.stderr


def imatrix(model: Path, text: Path, out: Path, *, ctx: int = 256, chunks: int | None = None) -> Path:
    """``llama-imatrix`` of ``model`` (an F32/F16/BF16 GGUF) over ``text`` (calibration text, UTF-8)."""
    args = ["-m", model, "-f", text, "-o", out, "-c", ctx, "-t", THREADS, "--no-ppl"]
    if chunks:
        args += ["--chunks", chunks]
    _run("llama-imatrix", *args)
    if not out.exists():
        raise LlamaToolError(f"llama-imatrix wrote no {out}")
    return out


def quantize(model: Path, out: Path, qtype: str, *, imatrix_file: Path | None = None,
             embedding_type: str | None = None) -> Path:
    """``llama-quantize model out TYPE`` (TYPE as llama.cpp names it: Q4_0, Q4_K_M, IQ4_NL ...), optionally
    imatrix-weighted and with the token embedding's type set (``--token-embedding-type``)."""
    args: list = []
    if imatrix_file is not None:
        args += ["--imatrix", imatrix_file]
    if embedding_type is not None:
        args += ["--token-embedding-type", embedding_type]
    _run("llama-quantize", *args, model, out, qtype, THREADS)
    return out


def perplexity_kld(model: Path, text: Path, base: Path, *, ctx: int, chunks: int, save: bool = False) -> str:
    """``llama-perplexity --kl-divergence``: with ``save`` writes the reference logits of ``model`` to ``base``,
    else compares ``model`` with them. Returns llama.cpp's printout (its summary at the end)."""
    flag = "--kl-divergence-base" if save else "--kl-divergence"
    args = ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-t", THREADS, "-b", ctx]
    args += ["--kl-divergence-base", base] if save else [flag, "--kl-divergence-base", base]
    return _run("llama-perplexity", *args)


def convert_hf(checkpoint: Path, out: Path, *, outtype: str = "f32") -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py`` of an HF checkpoint directory (what a user without us runs)."""
    import os as _os
    import sys

    d = tools_dir()
    env = dict(_os.environ, PYTHONPATH=str(d / "gguf-py"))  # the converter's own gguf-py, not the installed one
    proc = subprocess.run([sys.executable, str(d / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", outtype,
                           "--outfile", str(out)], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise LlamaToolError(f"convert_hf_to_gguf.py failed (exit {proc.returncode}): "
                             f"{lines[-1] if lines else 'no output'}")
    return out
