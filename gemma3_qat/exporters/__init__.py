"""Exporters: GGUF (``gguf``), safetensors (``safetensors``), gemma.cpp (``gemma_cpp``, container in ``sbs``), and
the facts they share (``layout``)."""

from __future__ import annotations

from gemma3_qat.errors import InputError

# Which ``--to`` each export option belongs to: any other target refuses it instead of ignoring it.
OPTION_TARGETS = {
    "type": ("gguf", "gemma-cpp"),
    "embedding_type": ("gguf",),
    "lossy": ("gguf",),
    "layout": ("safetensors",),
    "dtype": ("safetensors",),
}


def refuse_flags(to: str, **flags) -> None:
    """Refuse the options of another ``--to`` (given = neither None nor False) instead of ignoring them.

    Keyword names are the CLI's flags with ``_`` for ``-`` (``embedding_type`` -> ``--embedding-type``).
    """
    for name, value in flags.items():
        if value is not None and value is not False and to not in OPTION_TARGETS[name]:
            flag = "--" + name.replace("_", "-")
            owners = " / ".join(f"--to {t}" for t in OPTION_TARGETS[name])
            raise InputError(f"{flag} is a {owners} option and does not apply to --to {to}; drop it")
