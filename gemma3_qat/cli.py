"""The ``gemma3-qat`` command line: thin wrappers that parse, check flags, call one library function.

Known errors print one line naming the problem and the fix and exit with 1; set ``GEMMA3_QAT_DEBUG=1`` for the
traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from gemma3_qat import __version__
from gemma3_qat.errors import InputError, MissingFileError, OutputExistsError

app = typer.Typer(
    name="gemma3-qat",
    help="Quantization-aware training and exact export for Gemma 3 (int4-block = Q4_0, q4_k_m = Q4_K_M, int4-channel, sfp8).",
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
        {"format": f.name, "bits_per_weight": f.bits_per_weight, "bits_per_weight_max": f.bits_range[1],
         "mixture": f.is_mixture, "what": f.summary, "gguf": f.gguf_type, "runs_on": f.runtimes}
        for f in FORMATS.values()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        bits = f"{r['bits_per_weight']}" + (f"-{r['bits_per_weight_max']}" if r["mixture"] else "")
        typer.echo(f"{r['format']:<13} {bits:>7} bits/weight  {r['what']}")
        typer.echo(f"{'':<13} GGUF: {r['gguf']}")
        typer.echo(f"{'':<13} runs on: {r['runs_on']}")


# ---------------------------------------------------------------------------------------------------------- train
# The training knobs are declared once, in qat.config.TrainConfig (default, help, flag): `train` and `teacher-cache`
# get their options from there. None = not given: the recipe's value (or the built-in default) stands.
Recipe = Annotated[Optional[Path], typer.Option(help="Recipe YAML, or a shipped recipe's name (gemma3-1b-int4-block); "
                                                 "flags override its values. Default: the --model's released size's "
                                                 "recipe for --format (270m ... 27b), else recipes/default.yaml.")]
CACHE_KNOBS = ("model", "teacher", "data", "seq_len", "kd", "kd_k", "kd_temperature", "seed", "assistant_only")


def _with_knobs(names: tuple[str, ...] | None = None, defaults: dict | None = None, *, after: int = 1):
    """Give a command one option per ``TrainConfig`` knob (all, or ``names``), inserted after its first ``after``
    parameters; the command receives them as keyword arguments (None: not given)."""
    import inspect

    from gemma3_qat.qat.config import knobs

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        generated = []
        for k in knobs(names):
            kind = Optional[list[str]] if k.type == list[str] else Optional[k.type]
            default = (defaults or {}).get(k.name)
            generated.append(inspect.Parameter(k.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                               annotation=Annotated[kind, typer.Option(*k.flags, help=k.help)]))
        params = own[:after] + generated + own[after:]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        fn.__signature__ = inspect.Signature(params)
        return fn
    return decorate


@app.command()
@_with_knobs()
def train(
    recipe: Recipe = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output (default: the latest in "
                                         "runs/) from its last checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a run already in --output.")] = False,
    **knobs,
):
    """Quantization-aware training by distillation from the unquantized checkpoint.

    With no flags: the embedded default model and data on the CPU, in 8-14 minutes (2 cores).
    The recipe, unless --recipe names one: with --model of a released shape (a gemma-3-270m ... 27b checkpoint, a
    .gguf of one, or a fine-tune), gemma3-<size>-<format>.yaml (~5,000 steps, sized for GPUs); any other --model,
    or none, default.yaml (400 steps, tuned on the embedded model). The first line of the log says which. Every
    option below is also a recipe key (--seq-len is seq_len).

    Examples:
      gemma3-qat train --format int4-block
      gemma3-qat train --recipe recipes/gemma3-1b-int4-block.yaml --model google/gemma-3-1b-pt --data web.jsonl
      gemma3-qat train --model gemma-3-270m-q4_k_m.gguf --format q4_k_m --data text.jsonl
    """
    from gemma3_qat.qat.train import TrainConfig, resolve_recipe
    from gemma3_qat.qat.train import train as run

    flags = _overrides(**knobs)
    choice = resolve_recipe(recipe, flags.get("model"), flags.get("format"))
    typer.echo(f"recipe: {choice.why}")
    config = TrainConfig.from_recipe(choice, **flags)
    run(config, resume=resume, force=force, log=typer.echo)


@app.command("teacher-cache")
@_with_knobs(CACHE_KNOBS, {"kd": "topk"}, after=2)
def teacher_cache(
    output: Annotated[Path, typer.Option("--output", "-o", help="Cache directory to write.")],
    recipe: Recipe = None,
    batch_size: Annotated[int, typer.Option(help="Rows per teacher forward.")] = 8,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing cache.")] = False,
    **knobs,
):
    """Run the teacher once and store its sparse targets; then `train --teacher-cache DIR` needs no teacher.

    Use the same --model/--teacher/--data/--seq-len/--kd flags as the training run (a fingerprint checks it).
    """
    from gemma3_qat.qat.teacher_cache import build_from_config
    from gemma3_qat.qat.train import TrainConfig, resolve_recipe

    flags = _overrides(**knobs)
    choice = resolve_recipe(recipe, flags.get("model"))
    typer.echo(f"recipe: {choice.why}")
    config = TrainConfig.from_recipe(choice, **flags)
    build_from_config(config, output, force=force, batch_size=batch_size, log=typer.echo)


@app.command("sample-data")
def sample_data(
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON-lines file to write ({\"text\": ...} rows).")],
    model: Annotated[Optional[str], typer.Option(help="Checkpoint to sample from: local HF dir, .gguf file or hub "
                                                      "id. Default: the embedded model.")] = None,
    rows: Annotated[int, typer.Option(help="Rows to sample.")] = 8192,
    tokens: Annotated[int, typer.Option(help="Tokens per row (after BOS).")] = 255,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (1: the teacher as it is).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Rows sampled at once.")] = 64,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
):
    """Sample training text from the unquantized model itself, for `train --data FILE[:WEIGHT]`.

    Distillation on the teacher's own samples teaches the student where the teacher is uncertain, as on text it
    has not seen; its own training text does not (docs/results.md). Default: the embedded model.
    """
    from gemma3_qat.qat.teacher_text import write_teacher_text

    write_teacher_text(output, model=model, rows=rows, tokens=tokens, seed=seed, temperature=temperature,
                       batch_size=batch_size, force=force, log=typer.echo)


def _overrides(**flags) -> dict:
    """The flags given on the command line (None / an empty list = not given: the recipe's value stands)."""
    return {k: v for k, v in flags.items() if v is not None and v != []}


# ---------------------------------------------------------------------------------------------------------- export
@app.command()
def export(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="QAT checkpoint (a train output) or any Gemma 3 HF "
                                                               "checkpoint. Default: the latest run in runs/.")] = None,
    to: Annotated[str, typer.Option("--to", help="gguf (llama.cpp, Ollama, LM Studio), safetensors "
                                    "(transformers, vLLM) or gemma-cpp (gemma.cpp .sbs: SFP8 at 8 bits).")] = "gguf",
    layout: Annotated[Optional[str], typer.Option(help="--to safetensors: unquantized (dequantized on-grid values; "
                                                  "default), compressed-tensors (vLLM pack-quantized int4) or sfp8 "
                                                  "(codes + scale).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="--to safetensors: storage dtype of float tensors: f32 (exact; "
                                                 "default for unquantized), f16, bf16.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File (gguf) or directory (safetensors) "
                                                   "to write; its parent must exist. Default: inside the "
                                                   "checkpoint directory.")] = None,
    type: Annotated[Optional[str], typer.Option("--type", help="Plain (non-QAT) checkpoints. --to gguf: f32, f16, "
                                                "bf16, q8_0 or q4_0 (post-training quantization); --to gemma-cpp: "
                                                "bf16, f32 or sfp8.")] = None,
    embedding_type: Annotated[Optional[str], typer.Option(help="--to gguf, an embedding not trained quantized: auto "
                                                          "(= q8_0, llama.cpp's QAT choice; Google's F16 costs "
                                                          "+0.8-1.6 GB on the released sizes), q4_0, q8_0, f16, "
                                                          "bf16, f32.")] = None,
    lossy: Annotated[bool, typer.Option("--lossy", help="--to gguf, sfp8: write Q8_0 instead of exact BF16/F32 "
                                        "values.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (tensor types, sizes); write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files (the output and the model card, "
                                        "mmproj beside it).")] = False,
):
    """Export to GGUF (trained codes written exactly: int4 as Q4_0; tokenizer, chat template, mmproj), safetensors,
    or gemma.cpp's .sbs (sfp8 runs: the trained SFP8 codes and scales).

    Each --to takes only its own options; the other's are refused, not ignored.

    Examples:
      gemma3-qat export --to gguf                       # the latest run in runs/
      gemma3-qat export --to gguf runs/x -o x.gguf
      gemma3-qat export --to gguf ~/gemma-3-1b-pt --type q4_0   # the PTQ baseline
      gemma3-qat export --to safetensors runs/x -o x-vllm --layout compressed-tensors
      gemma3-qat export --to safetensors runs/x --dry-run
      gemma3-qat export --to gemma-cpp runs/x-sfp8 -o x.sbs        # then: gemma --weights x.sbs
    """
    from gemma3_qat.checkpoint import latest_run
    from gemma3_qat.exporters import TARGETS
    from gemma3_qat.exporters import export as run
    from gemma3_qat.report import plan_report, style_of

    if to not in TARGETS:
        raise InputError(f"unknown --to {to!r}; choose one of: {', '.join(TARGETS)}")
    style = style_of(as_json=as_json)
    if checkpoint is None:
        checkpoint = latest_run()
        if checkpoint is None:
            raise MissingFileError("no checkpoint given and no run in runs/; train first or name a checkpoint")
        typer.echo(f"exporting the latest run: {checkpoint}", err=as_json)
    log = (lambda *_: None) if as_json else typer.echo
    plan = run(checkpoint, to, output, force=force, dry_run=dry_run, log=log, type=type,
               embedding_type=embedding_type, lossy=lossy, layout=layout, dtype=dtype)
    report = plan_report(plan.path, plan.rows(), nbytes=plan.nbytes, notes=plan.notes, dry_run=dry_run)
    if style == "json" or dry_run:
        typer.echo(report.render(style), nl=False)
    else:  # the plan's title line and notes; the tensor table only with --dry-run
        typer.echo(report.tables[0].title)
        for note in report.tables[0].notes:
            typer.echo(note)




@app.command("import")
def import_(
    checkpoint: Annotated[Path, typer.Argument(help="A bf16 checkpoint of QAT weights, as Google's "
                                                    "gemma-3-*-qat-q4_0-unquantized releases ship them.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="QAT checkpoint directory to write.")],
    format: Annotated[str, typer.Option("--format", "-f", help="The lattice to recover: int4-block (Q4_0, "
                                        "Google's) or int4-channel.")] = "int4-block",
    tie_rule: Annotated[str, typer.Option(help="Which scale, where bf16 cannot tell several fp16 scales apart: "
                                          "q4_0 (nearest Q4_0's own rule; default), middle, smallest, largest.")]
    = "q4_0",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output.")] = False,
):
    """Recover the exact int4 lattice (fp16 scale + codes per block) of a bf16 QAT checkpoint into a QAT checkpoint.

    Every block must reproduce every stored bf16 value (at least 99.9% of the blocks of each matmul; an ordinary
    checkpoint is refused, naming the fraction). Then `export` writes the recovered codes exactly, and `train
    --model OUTPUT` continues QAT from the lattice (its step 0 is the recovered file).

    Examples:
      gemma3-qat import ~/gemma-3-1b-it-qat-q4_0-unquantized -o runs/gemma-3-1b-it-qat
      gemma3-qat export --to gguf runs/gemma-3-1b-it-qat -o gemma-3-1b-it-qat-q4_0.gguf
      gemma3-qat train --model runs/gemma-3-1b-it-qat --teacher google/gemma-3-1b-it --data chat.jsonl
    """
    from gemma3_qat.recover import write_recovered_checkpoint

    result = write_recovered_checkpoint(checkpoint, output, format, rule=tie_rule, force=force, log=typer.echo)
    typer.echo(result.lines()[0])
    typer.echo(f"wrote {output} (a QAT checkpoint: export it, or train --model {output})")


@app.command("eval")
def eval_(
    candidates: Annotated[list[Path], typer.Argument(help="QAT checkpoints (fake quantization from qat.json, "
                                                         "PyTorch) and/or .gguf files (run in llama.cpp).")],
    teacher: Annotated[Optional[str], typer.Option(help="Unquantized reference. Default: the teacher in the "
                                                   "candidates' qat.json, else the embedded model.")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Held-out FILE (.jsonl/.txt...), repeatable. Default: "
                                                           "the embedded validation split.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 256,
    max_windows: Annotated[int, typer.Option(help="Windows to evaluate.")] = 32,
    baseline: Annotated[Optional[str], typer.Option(help="Name of the PTQ candidate to compute recovered "
                                                         "fractions against (default: the 0-step one).")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a markdown table.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
):
    """Compare candidates with the teacher: perplexity, KL (mean, p99), top-1 agreement, recovered fraction.

    Examples:
      gemma3-qat eval runs/ptq runs/qat                      # PyTorch, fake quantization applied
      gemma3-qat eval runs/ptq/ptq.gguf runs/qat/qat.gguf    # the shipped files, in llama.cpp
    """
    from gemma3_qat.evaluate import evaluate

    report = evaluate(candidates, teacher=teacher, data=data or None, seq_len=seq_len, max_windows=max_windows,
                      baseline=baseline, log=(lambda *_: None) if as_json else typer.echo)
    typer.echo(report.to_json() if as_json else report.table(markdown=markdown))


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A .gguf (llama.cpp) or .sbs (gemma.cpp) file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (metadata values whole).")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV output.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Markdown tables.")] = False,
):
    """Show a GGUF or gemma.cpp .sbs file's metadata, tensor table and totals (the file is validated first).

    Examples:
      gemma3-qat inspect model.gguf
      gemma3-qat inspect model.gguf --json
      gemma3-qat inspect model.sbs
    """
    from gemma3_qat.report import inspect_report, style_of

    style = style_of(as_json=as_json, as_csv=as_csv, as_markdown=as_markdown)
    if not file.exists():
        raise MissingFileError(f"{file} does not exist")
    if file.suffix == ".sbs":
        from gemma3_qat.runtimes.gemma_cpp import inspect_sbs as inspect_file
    else:
        from gemma3_qat.gguf_file import inspect_gguf as inspect_file
    text = inspect_report(inspect_file(file)).render(style)
    typer.echo(text, nl=not text.endswith("\n"))  # tables end with one; JSON does not


@app.command()
def memory(
    model: Annotated[Optional[str], typer.Option(help="270m, 1b, 4b, 12b, 27b or a directory with a Gemma 3 config.json. "
                                                 "Default: an overview of the five sizes.")] = None,
    format: Annotated[Optional[list[str]], typer.Option("--format", "-f", help="bf16, int4-channel, int4-block, "
                                                        "sfp8, q4_k_m, a llama.cpp lattice (q4_k, q6_k, q5_0, "
                                                        "q8_0-lattice) (or f32, f16, q8_0, q4_0); repeatable. "
                                                        "Default: Table 3's four.")] = None,
    container: Annotated[Optional[str], typer.Option(help="gguf (what our exporter writes) or compact "
                                                     "(compressed-tensors / gemma.cpp). Default: both.")] = None,
    embedding: Annotated[str, typer.Option(help="auto (gguf Q8_0, compact bf16), quantized (trained on the "
                                           "format's grid), or f32, f16, bf16, q8_0, q4_0.")] = "auto",
    vision: Annotated[str, typer.Option(help="auto (gguf: mmproj F16/F32; compact: bf16), none, f32, f16, "
                                        "bf16.")] = "auto",
    context: Annotated[int, typer.Option(help="KV cache context in tokens.")] = 32_768,
    kv_dtype: Annotated[str, typer.Option("--kv-dtype", help="bf16, f16, f32, q8_0 or q4_0.")] = "bf16",
    batch: Annotated[int, typer.Option(help="Sequences (KV cache); micro-batch per GPU (--training).")] = 1,
    table3: Annotated[bool, typer.Option("--table3", help="Table 3 of the report: published, reproduced, first "
                                         "principles.")] = False,
    training: Annotated[bool, typer.Option("--training", help="QAT training memory per GPU.")] = False,
    seq_len: Annotated[int, typer.Option(help="--training: tokens per sequence.")] = 2048,
    gpus: Annotated[int, typer.Option(help="--training: GPUs (FSDP shards weights, gradients, AdamW).")] = 1,
    device: Annotated[str, typer.Option(help="--training: cuda or cpu.")] = "cuda",
    mixed_precision: Annotated[str, typer.Option(help="--training: auto (what train does on this host: bf16 on "
                                                 "CUDA and on CPUs with native bf16 matmuls, for models at least "
                                                 "256 wide), bf16 or no.")] = "auto",
    kd: Annotated[str, typer.Option("--kd", help="--training: full, sampled or topk.")] = "full",
    measure: Annotated[Optional[Path], typer.Option(help="Compare a .gguf file with the prediction, tensor by "
                                                    "tensor.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV output.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Markdown tables.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write a PNG: KV vs context, weights + KV per format "
                                                 "(needs matplotlib).")] = None,
    check: Annotated[Optional[Path], typer.Option(help="Compare with a baseline JSON; exit 1 on drift.")] = None,
    update_baseline: Annotated[Optional[Path], typer.Option(help="Rewrite this baseline JSON.")] = None,
    tolerance: Annotated[float, typer.Option(help="--check: allowed relative drift.")] = 0.0,
):
    """Memory of Gemma 3: parameters, weights per format, KV cache, training; Table 3 of the report; CI baseline.

    GB = 1e9 bytes. Examples:
      gemma3-qat memory --table3
      gemma3-qat memory --model 27b --context 32768 --kv-dtype q8_0
      gemma3-qat memory --model 27b --training --gpus 8 --seq-len 2048
      gemma3-qat memory --measure model-int4-block.gguf
      gemma3-qat memory --check benchmarks/memory-baseline.json
    """
    from gemma3_qat import memory as mem
    from gemma3_qat.report import style_of

    style = style_of(as_json=as_json, as_csv=as_csv, as_markdown=as_markdown)
    query = mem.MemoryQuery(
        model=model, formats=tuple(format or ()), container=container, embedding=embedding, vision=vision,
        context=context, kv_dtype=kv_dtype, batch=batch, table3=table3, training=training, seq_len=seq_len, gpus=gpus,
        device=device, mixed_precision=mixed_precision, kd=kd, measure=measure, check=check, update_baseline=update_baseline, tolerance=tolerance,
        per_tensor=style != "text")
    report = query.report()
    text = report.render(style)
    typer.echo(text, nl=not text.endswith("\n"))  # tables end with one; JSON does not
    if plot:
        path = mem.plot(plot, model or "27b", formats=query.chosen_formats, kv_dtype=kv_dtype)
        typer.echo(f"wrote {path}", err=style != "text")
    if report.failed:
        raise typer.Exit(1)


@app.command("pretrain-default", hidden=True)
def pretrain_default(
    recipe: str = typer.Option("recipes/default-pretrain.yaml", help="Pretraining recipe (YAML)."),
    output: str = typer.Option("gemma3_qat/assets/default-model", "--output", "-o", help="Where to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing model at OUTPUT."),
):
    """Rebuild the embedded default model from scratch (maintainers; about 40 minutes on 2 CPU cores)."""
    from pathlib import Path

    from gemma3_qat.embedded.pretrain import PretrainRecipe
    from gemma3_qat.embedded.pretrain import pretrain_default as run

    if Path(output).exists() and not force:
        raise OutputExistsError(f"{output} exists; pass --force to rebuild it")
    run(PretrainRecipe.load(recipe), Path(output), log=typer.echo)


def _error_message(exc: BaseException) -> str | None:
    """The one error table: one line for failures a user can fix; None for bugs (they keep their traceback)."""
    from gemma3_qat.errors import Gemma3QATError

    if isinstance(exc, Gemma3QATError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None:  # disk full, permission denied, read-only, ...
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


def main() -> None:
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # silence CUDA-only extension warnings
    # torchao (imported by transformers' quantizer registry) registers enums the way torch now deprecates: one
    # warning per enum on every command, about code that is not ours
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    debug = bool(os.environ.get("GEMMA3_QAT_DEBUG"))
    try:
        app()
    except KeyboardInterrupt as exc:
        if debug:
            raise
        typer.echo(f"interrupted: {exc}" if str(exc) else "interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one error table of the CLI
        if debug:
            raise
        message = _error_message(exc)
        if message is None:
            first = str(exc).splitlines()[0] if str(exc) else ""
            typer.echo(f"internal error: {type(exc).__name__}{': ' + first if first else ''} -- this is a bug in "
                       f"gemma3-qat {__version__}; please report it with the output of GEMMA3_QAT_DEBUG=1 "
                       "(which shows the traceback)", err=True)
            sys.exit(1)
        code = getattr(exc, "exit_code", 1)  # TrainingStopped: 130, the shell's code for a stop by SIGINT
        typer.echo(f"error: {message}" if code == 1 else message, err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
