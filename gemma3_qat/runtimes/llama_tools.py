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
import sys
from pathlib import Path

from gemma3_qat.errors import InputError, MissingFileError

ENV_VAR = "LLAMA_TOOLS_DIR"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
THREADS = 2


class LlamaToolError(InputError):
    """A llama.cpp tool is missing or failed (its last line is quoted)."""


def _complete(d: Path) -> bool:
    """Every tool the build script makes is there (a build cut short leaves some out)."""
    return all((d / "bin" / tool).is_file() for tool in TOOLS) and (d / "convert_hf_to_gguf.py").is_file()


def tools_dir() -> Path:
    """The directory holding ``bin/llama-quantize`` etc.; a one-line error with the fix when there is none."""
    if os.environ.get(ENV_VAR):
        d = Path(os.environ[ENV_VAR])
        if _complete(d):
            return d
        raise MissingFileError(f"${ENV_VAR}={d} lacks some of {', '.join(TOOLS)} or convert_hf_to_gguf.py; "
                               "run scripts/build_llama_tools.sh")
    repo = Path(__file__).resolve().parents[2]
    found = sorted((d for d in (repo / ".wheelhouse").glob("llama-tools-*") if _complete(d)),
                   key=lambda d: d.stat().st_mtime)
    if not found:
        raise MissingFileError("llama.cpp's tools are not built: run scripts/build_llama_tools.sh (about 6 minutes)"
                               f" or set ${ENV_VAR}")
    return found[-1]


def available() -> bool:
    try:
        tools_dir()
    except MissingFileError:
        return False
    return True


def _call(cmd: list, name: str, *, timeout: float = 3600, env: dict | None = None) -> str:
    """Run ``cmd`` and return its output; a failure quotes its last line."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise LlamaToolError(f"{name} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
    return proc.stdout + proc.stderr


def _run(tool: str, *args, timeout: float = 3600) -> str:
    """``bin/<tool> args...`` of the built tools."""
    return _call([tools_dir() / "bin" / tool, *args], tool, timeout=timeout)


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
             embedding_type: str | None = None, tensor_types: dict[str, str] | None = None,
             pure: bool = False) -> Path:
    """``llama-quantize model out TYPE`` (TYPE as llama.cpp names it: Q4_0, Q4_K_M, IQ4_NL ...), optionally
    imatrix-weighted, with the token embedding's type set (``--token-embedding-type``), types per tensor name
    (``--tensor-type attn_v=f32``) and ``--pure`` (TYPE for every other matmul, no mixture)."""
    args: list = ["--pure"] if pure else []
    if imatrix_file is not None:
        args += ["--imatrix", imatrix_file]
    if embedding_type is not None:
        args += ["--token-embedding-type", embedding_type]
    for name, kind in (tensor_types or {}).items():
        args += ["--tensor-type", f"{name}={kind}"]
    _run("llama-quantize", *args, model, out, qtype, THREADS)
    return out


def perplexity_kld(model: Path, text: Path, base: Path, *, ctx: int, chunks: int, save: bool = False) -> str:
    """``llama-perplexity --kl-divergence``: with ``save`` writes the reference logits of ``model`` to ``base``,
    else compares ``model`` with them. Returns llama.cpp's printout (its summary at the end)."""
    args = ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-t", THREADS, "-b", ctx,
            "--kl-divergence-base", base]
    return _run("llama-perplexity", *args, *([] if save else ["--kl-divergence"]))


def convert_hf(checkpoint: Path, out: Path, *, outtype: str = "f32") -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py`` of an HF checkpoint directory (what a user without us runs)."""
    d = tools_dir()
    env = dict(os.environ, PYTHONPATH=str(d / "gguf-py"))  # the converter's own gguf-py, not the installed one
    _call([sys.executable, d / "convert_hf_to_gguf.py", checkpoint, "--outtype", outtype, "--outfile", out],
          "convert_hf_to_gguf.py", env=env)
    if not out.exists():
        raise LlamaToolError(f"convert_hf_to_gguf.py wrote no {out}")
    return out
