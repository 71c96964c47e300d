"""The ``gemma3-qat`` command line: thin wrappers that parse, check flags, call one library function.

Known errors print one line naming the problem and the fix and exit with 1; set ``GEMMA3_QAT_DEBUG=1`` for the
traceback.
"""

from __future__ import annotations

import json
import os
import sys

import typer

from gemma3_qat import __version__

app = typer.Typer(
    name="gemma3-qat",
    help="Quantization-aware training and exact export for Gemma 3 (int4-block = Q4_0, int4-channel, sfp8).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"gemma3-qat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """Quantization-aware training and exact export for Gemma 3."""


@app.command()
def formats(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List the QAT weight formats, their bits per weight and where each runs.

    Example: gemma3-qat formats --json
    """
    from gemma3_qat.formats import FORMATS

    rows = [
        {"format": f.name, "bits_per_weight": f.bits_per_weight, "what": f.summary, "gguf": f.gguf_type,
         "runs_on": f.runtimes}
        for f in FORMATS.values()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        typer.echo(f"{r['format']:<13} {r['bits_per_weight']:>4} bits/weight  {r['what']}")
        typer.echo(f"{'':<13} GGUF: {r['gguf']}")
        typer.echo(f"{'':<13} runs on: {r['runs_on']}")


@app.command("pretrain-default", hidden=True)
def pretrain_default(
    recipe: str = typer.Option("recipes/default-pretrain.yaml", help="Pretraining recipe (YAML)."),
    output: str = typer.Option("gemma3_qat/assets/default-model", "--output", "-o", help="Where to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model at OUTPUT."),
):
    """Rebuild the embedded default model from scratch (maintainers; about 40 minutes on 2 CPU cores)."""
    from pathlib import Path

    from gemma3_qat.pretrain import PretrainRecipe
    from gemma3_qat.pretrain import pretrain_default as run

    if Path(output).exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to rebuild it")
    run(PretrainRecipe.load(recipe), Path(output), log=typer.echo)


def _error_message(exc: BaseException) -> str | None:
    """One line for the errors a user can fix; None for bugs (those keep their traceback)."""
    from gemma3_qat.formats import FormatError
    from gemma3_qat.models import NotGemma3Error

    if isinstance(exc, (FormatError, NotGemma3Error, FileNotFoundError, FileExistsError, ValueError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def main() -> None:
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # silence CUDA-only extension warnings
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - the one error table of the CLI
        message = _error_message(exc)
        if message is None or os.environ.get("GEMMA3_QAT_DEBUG"):
            raise
        typer.echo(f"error: {message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
