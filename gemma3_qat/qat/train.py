"""QAT by knowledge distillation: the student (a fake-quantized copy) learns the frozen teacher's probabilities.

    gemma3-qat train --format int4-block                       # the embedded default model and data, on the CPU
    accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml -m gemma3_qat.cli train \\
        --recipe recipes/gemma3-27b-int4-block.yaml

Features and their flags (every knob is a recipe key and a flag, declared once in ``qat.config.TrainConfig``):
* formats ``--format`` (``gemma3-qat formats``: int4-block, int4-channel, sfp8, q4_k_m and its lattices), ``--quantize-embeddings`` (the tied table, lookup and head)
* KD ``--kd full|sampled|topk``, ``--kd-k``, ``--kd-temperature``, ``--kd-alpha`` (mix in the next-token loss),
  computed in chunks of positions with the LM heads inside the chunk (``distill.kd_loss``, ``head``): no
  ``[tokens x vocab]`` tensor for a whole micro-batch, in training or validation
* teacher: live (frozen, eval mode; held in the precision ``--mixed-precision`` resolves to: bf16 on CUDA and on CPUs with native bf16 matmuls) or ``--teacher-cache DIR`` (no teacher in memory)
* data: ``--data FILE[:WEIGHT]`` (jsonl/json/parquet/txt or hub ids; ``text`` or chat ``messages``), packing,
  ``--assistant-only``
* AdamW, warmup + cosine, gradient clipping, gradient accumulation, bf16 autocast (CUDA, and CPUs with native bf16 matmuls), gradient checkpointing
* accelerate: one process on CPU or GPU, DDP, FSDP (configs in ``recipes/accelerate/``)
* checkpoints every ``--save-every`` steps and on SIGINT/SIGTERM, atomic, each a valid QAT checkpoint with a
  ``manifest.json`` (size and SHA-256 per file); ``--resume`` continues from the newest checkpoint that verifies,
  naming those it skips and why
* logs: progress bar, ``metrics.jsonl`` (loss, KD and CE apart, lr, tokens/s, grad norm, peak memory), periodic
  validation (the same keys whatever the teacher: ``val_kl`` KL to the teacher, None with a teacher cache,
  which holds no full distribution; ``val_kd_loss`` the KD objective; ``val_top1``; ``val_ppl``);
  ``--log-with tensorboard|wandb``

Under bf16 autocast the fake-quantized weight is rounded to bf16 before the matmul: int4 values ``k * D`` need up
to 14 significant bits, so training then sees values within 2**-9 relative of the runtime's (docs/design.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from gemma3_qat import __version__
from gemma3_qat.checkpoint import (MANIFEST, QAT_JSON, TRAIN_CONFIG, QATMetadata, default_output, latest_run,
                                   verify_manifest, write_manifest, write_qat_checkpoint)
from gemma3_qat.errors import CorruptFileError, Gemma3QATError, InputError, MissingFileError, OutputExistsError
from gemma3_qat.formats import FormatError
from gemma3_qat.qat.data import MixtureSampler, setup_run_data
from gemma3_qat.qat.config import TrainConfig, fake_quant_cache_on
from gemma3_qat.qat.precision import choose_precision
from gemma3_qat.qat.distill import kd_loss, load_teacher, validation_sums
from gemma3_qat.qat.recipes import resolve_recipe  # noqa: F401 (re-exported)

__all__ = ["QATRecipe", "TrainConfig", "TrainingError", "TrainingStopped", "latest_run", "resolve_recipe", "train"]

TRAINER_STATE = "trainer_state.json"  # in checkpoints/step-N/trainer/, next to accelerate's state: step and seed
PTQ_INIT_ROWS = 64  # training rows whose activations weigh the imatrix scale search


class TrainingError(Gemma3QATError, RuntimeError):
    """Training cannot go on (NaN loss, a mismatched teacher cache, ...); the message says what to do."""


class TrainingStopped(Gemma3QATError):
    """SIGINT/SIGTERM asked for a clean stop: a checkpoint was saved and the run can go on with ``--resume``.

    Not a ``KeyboardInterrupt``: code around ``train`` reads that as an abort anywhere, mid-write included, while
    this stop is orderly and says how to go on. The CLI prints the message and exits with ``exit_code`` (130, the
    shell's code for a stop by SIGINT)."""

    exit_code = 130


def _peak_memory_mb(device: torch.device) -> float:
    """This process's peak: the CUDA allocator's on a GPU; on the CPU the resident set's high-water mark VmHWM.
    Not ``ru_maxrss``: Linux carries it over fork + exec, so a run started by another process (pytest, a
    launcher) would report that parent's peak; the benchmarks and the memory tests read VmHWM too."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


class QATRecipe:
    """setup -> train -> cleanup. One instance per run."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, force: bool = False, log=print):
        self.config, self.resume, self.force, self.log = config, resume, force, log
        self.stop_requested = False

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, output check, then data, student, teacher and optimizer (each its own step, as in
        torchtune's recipes); every input is validated before the run directory is written."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        import datasets

        datasets.disable_progress_bars()  # the `data:` lines report what was loaded
        # save_state drops the tied head (lm_head = embed_tokens) and warns each time: expected for Gemma 3
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
        c = self.config
        from gemma3_qat.sources import source_architecture

        self.precision = choose_precision(c.mixed_precision, cuda=torch.cuda.is_available(),
                                          hidden=source_architecture(c.model).hidden)
        # accelerate keeps one AcceleratorState per process and refuses another precision in it: a second run in
        # the same process (a library caller, the tests) may train in another one (the process group stays)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        self.accelerator = acc = Accelerator(mixed_precision=self.precision.mode, log_with=c.log_with or None,
                                             project_dir=c.output)
        if not acc.is_main_process:
            self.log = lambda *_: None  # one process speaks
        self.log(f"precision: {self.precision.why}")
        self.device = acc.device
        self.is_fsdp = acc.distributed_type.name == "FSDP"
        self.output = self._check_output()
        if self.resume:  # damaged checkpoints are named before minutes of model loading, not after
            self._resume_candidates = self._verified_checkpoints()
        set_seed(c.seed)

        self._setup_data()
        student = self._setup_student()
        self._create_output()  # model, data and flags are valid: now the run directory may be written
        self._setup_teacher()
        optimizer = self._setup_optimizer(student)
        self.student, self.optimizer = acc.prepare(student, optimizer)
        self.step = 0
        if self.resume:
            self._resume_from_checkpoint()
        if acc.is_main_process:
            (self.output / TRAIN_CONFIG).write_text(yaml.safe_dump(asdict(c), sort_keys=False))
        if c.log_with:
            acc.init_trackers("gemma3-qat", config=asdict(c))
        if self.device.type == "cpu":  # after the models are loaded: what loading frees goes back to the system
            from gemma3_qat.qat.cpu_memory import configure_for_training

            self.log(f"cpu memory: {configure_for_training()}")
        self._install_signal_handlers()

    def _setup_data(self) -> None:
        """Sources, tokenizer and packed rows (``data.setup_run_data``, shared with the teacher cache), the
        mixture sampler, and the gradient accumulation that makes up the global batch."""
        c, acc = self.config, self.accelerator
        run = setup_run_data(c, log=self.log)
        self.model_source, self.teacher_source, self.tokenizer_dir = run.model_source, run.teacher_source, \
            run.tokenizer_dir
        self.tokenizer, self.data_sources = run.tokenizer, run.sources
        self.train_data, self.valid_data = run.train, run.valid
        self.sampler = MixtureSampler(self.train_data, [s.weight for s in self.data_sources], c.seed)
        per_step = acc.num_processes * c.micro_batch_size
        if c.batch_size % per_step:
            raise InputError(f"--batch-size {c.batch_size} must be a multiple of processes x --micro-batch-size "
                             f"= {acc.num_processes} x {c.micro_batch_size}")
        self.accumulation = c.batch_size // per_step

    def _setup_student(self):
        """The student: fp32 master (latent) weights, fake-quantized in the run's format."""
        from gemma3_qat.models import architecture_from_config
        from gemma3_qat.qat.prepare import fake_quantizers, prepare
        from gemma3_qat.sources import load_gemma3

        c = self.config
        student = load_gemma3(self.model_source, dtype=torch.float32)
        self.architecture = architecture_from_config(student.config, Path(self.model_source).name, self.model_source)
        context = self.architecture.context
        if c.seq_len > context:
            raise InputError(f"--seq-len {c.seq_len} is beyond the model's context of {context} tokens")
        if c.ptq_init == "imatrix" and not self.resume:  # a resumed run's weights come from its checkpoint
            from gemma3_qat.qat.ptq_init import activation_importance, search_scales

            rows = self.train_data.input_ids[:PTQ_INIT_ROWS]
            # under FSDP the whole model may not fit one device before sharding: the calibration runs on the CPU
            device = torch.device("cpu") if self.is_fsdp else self.device
            importance = activation_importance(student.to(device), rows, c.micro_batch_size)
            self.log(search_scales(student, c.format, importance).line())
        # only a run that trains moves latents: a steps-0 run is the PTQ baseline and keeps the source's weights
        if not self.resume and c.steps > 0:
            from gemma3_qat.qat.ptq_init import move_off_boundaries

            line = move_off_boundaries(student, c.format, embedding=c.quantize_embeddings)
            if line:
                self.log(line)
        cache = fake_quant_cache_on(c.fake_quant_cache, self.is_fsdp)
        self.prepare_report = prepare(student, c.format, quantize_embeddings=c.quantize_embeddings, cache=cache,
                                      scale_grad=c.scale_grad)
        self.fake_quantizers = fake_quantizers(student)
        if c.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
        return student

    def _setup_teacher(self) -> None:
        """A live teacher (``distill.load_teacher``) or a teacher cache checked against this run's fingerprint."""
        self.teacher = None
        self.teacher_cache = None
        if self.config.teacher_cache:
            from gemma3_qat.qat.teacher_cache import TeacherCache

            self.teacher_cache = TeacherCache.open(self.config.teacher_cache, expected=self._cache_fingerprint())
        else:
            self.teacher = load_teacher(self.teacher_source, self.device, self.precision)

    def _setup_optimizer(self, student) -> torch.optim.Optimizer:
        """AdamW (no weight decay on norms and other vectors; their lr and the embedding's optionally scaled) and
        warmup + cosine."""
        c, acc = self.config, self.accelerator
        trained = [p for p in student.parameters() if p.requires_grad]
        # the embedding has a group of its own only at its own lr: the default keeps two groups, so checkpoints
        # written before the option existed still resume
        own = student.get_input_embeddings().weight if c.embedding_lr_mult != 1 else None
        groups = [{"params": [p for p in trained if p.dim() >= 2 and p is not own], "weight_decay": c.weight_decay},
                  {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0, "lr": c.lr * c.vector_lr_mult},
                  {"params": [p for p in trained if p is own], "weight_decay": c.weight_decay,
                   "lr": c.lr * c.embedding_lr_mult}]
        # the CPU takes torch's fused AdamW: one pass over each parameter, no temporaries the size of the embedding
        fused = True if self.device.type == "cpu" else None
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=c.lr, betas=(0.9, 0.95), fused=fused)
        # The schedule counts optimizer steps of the global batch. accelerate's prepared scheduler would step once
        # per process per call (it assumes per-process batches): keep it ours, and checkpoint it with the rest.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        acc.register_for_checkpointing(self.scheduler)
        return optimizer

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _check_output(self) -> Path:
        c = self.config
        if c.output is None:
            previous = latest_run(finished=False) if self.resume else None
            c.output = str(previous or default_output(c.model, c.format))
            if previous:
                self.log(f"resuming the most recent run: {previous}")
        out = Path(c.output)
        holds_run = (out / TRAIN_CONFIG).exists()
        if holds_run and not (self.resume or self.force):
            raise OutputExistsError(f"{out} already holds a training run; pass --resume to continue it or --force to "
                                  "replace it")
        if self.resume and not holds_run:
            raise MissingFileError(f"nothing to resume in {out}: it holds no training run")
        if holds_run and self.resume:
            previous = yaml.safe_load((out / TRAIN_CONFIG).read_text())
            for key in ("format", "model", "quantize_embeddings", "kd", "seq_len", "batch_size", "seed"):
                if previous.get(key) != getattr(c, key):
                    raise InputError(f"--resume: {key} was {previous.get(key)!r} in {out}, now {getattr(c, key)!r}")
        self._replace_run = holds_run and self.force and not self.resume
        return out

    def _create_output(self) -> None:
        if self._replace_run and self.accelerator.is_main_process:
            shutil.rmtree(self.output)
        self.accelerator.wait_for_everyone()
        self.output.mkdir(parents=True, exist_ok=True)

    def _cache_fingerprint(self) -> dict:
        from gemma3_qat.qat.teacher_cache import fingerprint

        return fingerprint(self.teacher_source, self.train_data, self.valid_data, self.config.kd_config)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True
            self.log(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

        self._previous_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous_handlers[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass

    def restore_signal_handlers(self) -> None:
        """Give SIGINT/SIGTERM back (a library caller's Ctrl-C must not keep asking a finished run to stop)."""
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        c, acc = self.config, self.accelerator
        rows = self.sampler.rows_for_step(self.step, c.batch_size)
        labels_all = self.train_data.labels[rows][:, 1:]
        normalizer = float((labels_all != -100).sum().clamp(min=1)) / acc.num_processes  # DDP averages over ranks
        mine = rows.view(acc.num_processes, -1)[acc.process_index]
        sums = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0}
        self.student.train()
        for i, micro in enumerate(mine.split(c.micro_batch_size)):
            input_ids = self.train_data.input_ids[micro].to(self.device)
            labels = self.train_data.labels[micro].to(self.device)
            target = None
            if self.teacher_cache is not None:
                target = self.teacher_cache.target(micro, split="train", device=self.device)
            sync = i == self.accumulation - 1
            with acc.no_sync(self.student) if not sync else nullcontext():
                with acc.autocast():  # student and teacher forward; the loss chunked with the heads (distill.kd_loss)
                    loss, parts = kd_loss(self.student, input_ids, labels, c.kd_config, teacher=self.teacher,
                                          target=target, sample_ids=micro, normalizer=normalizer)
                acc.backward(loss)
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += float(v)
        grad_norm = acc.clip_grad_norm_(self.student.parameters(), c.max_grad_norm)
        self.optimizer.step()
        for quantizer in self.fake_quantizers:  # the fused AdamW updates in place without a version bump
            quantizer.invalidate()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = acc.reduce(torch.tensor([sums["loss"], sums["kd_loss"], sums["ce_loss"]], device=self.device),
                            reduction="sum") / acc.num_processes
        metrics = {"loss": float(totals[0]), "kd_loss": float(totals[1]),
                   "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "lr": self.scheduler.get_last_lr()[0], "tokens": int(c.batch_size * c.seq_len)}
        if c.kd_alpha > 0:
            metrics["ce_loss"] = float(totals[2])
        return metrics

    # ------------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict:
        """The same keys whatever the teacher source: ``val_kl`` (KL(teacher || student) over the vocabulary; None
        with a teacher cache, which holds no full distribution), ``val_kd_loss`` (the run's KD objective: the same
        targets live and cached, so the same number), ``val_top1`` (agreement with the teacher's top-1) and
        ``val_ppl``. Definitions: ``distill.token_metrics``."""
        c, acc = self.config, self.accelerator
        kd = c.kd_config
        rows = torch.arange(min(c.eval_rows, len(self.valid_data)))
        if len(rows) == 0:
            return {}
        mine = rows[acc.process_index::acc.num_processes]
        self.student.eval()
        sums = torch.zeros(5, device=self.device)  # kl, kd, top1, nll, count
        for micro in mine.split(c.micro_batch_size):
            input_ids = self.valid_data.input_ids[micro].to(self.device)
            labels = self.valid_data.labels[micro].to(self.device)
            cached = {}
            if self.teacher is None:  # the cached targets and top-1 ids of these validation rows
                cached = {"target": self.teacher_cache.target(micro, split="valid", device=self.device),
                          "teacher_top1": self.teacher_cache.top1(micro, split="valid", device=self.device)}
            with acc.autocast():
                sums += validation_sums(self.student, input_ids, labels, kd, teacher=self.teacher, sample_ids=micro,
                                        **cached)
        sums = acc.reduce(sums, reduction="sum")
        n = max(float(sums[4]), 1.0)
        return {"val_kl": float(sums[0]) / n if self.teacher is not None else None, "val_kd_loss": float(sums[1]) / n,
                "val_top1": float(sums[2]) / n, "val_ppl": math.exp(float(sums[3]) / n)}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _metadata(self, metrics: dict) -> QATMetadata:
        c = self.config
        return QATMetadata(
            format=c.format, quantize_embeddings=c.quantize_embeddings,
            quantized_modules=self.prepare_report.quantized, teacher=self.teacher_source,
            data=[f"{s.path}:{s.weight:g}" for s in self.data_sources], steps=self.step,
            kd=c.kd if c.steps else None, metrics=metrics, gemma3_qat_version=__version__,
            precision=self.precision.mode)

    def save_checkpoint(self, metrics: dict) -> Path:
        """checkpoints/step-NNNNNN: a QAT checkpoint plus the trainer state and a manifest; written to a temp dir,
        then renamed. The previous good checkpoints stay until the new one is complete."""
        acc = self.accelerator
        root = self.output / "checkpoints"
        final = root / f"step-{self.step:06d}"
        tmp = root / f".step-{self.step:06d}.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        write_qat_checkpoint(self.student, tmp, self._metadata(metrics), self.tokenizer_dir,
                             prepared_format=self.prepare_report.config.format, accelerator=acc)
        acc.save_state(str(tmp / "trainer"))
        acc.wait_for_everyone()  # every process's part (RNG states, FSDP shards) is on disk before the manifest
        if acc.is_main_process:
            (tmp / "trainer" / TRAINER_STATE).write_text(json.dumps({"step": self.step, "seed": self.config.seed}))
            write_manifest(tmp)  # last: sizes and SHA-256 of every file, checked by --resume and the exporters
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            done = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in done[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    @staticmethod
    def _checkpoint_problem(path: Path) -> str | None:
        """Why ``path`` cannot be resumed from (one short clause), or None: its manifest (every file's size and
        checksum: the weights, optimizer and RNG states resume reads) and its trainer state."""
        state = path / "trainer" / TRAINER_STATE
        if not state.is_file():
            return f"no trainer/{TRAINER_STATE}"
        try:
            verify_manifest(path)
        except CorruptFileError as e:
            return str(e).split("; ")[0].replace(f"{path}/", "")
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            return f"trainer/{TRAINER_STATE} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})"
        if not isinstance(step, int) or path.name != f"step-{step:06d}":
            return f"trainer/{TRAINER_STATE} says step {step!r}"
        return None

    def _verified_checkpoints(self) -> list[tuple[Path, str | None]]:
        """Every checkpoint, newest first, with why it cannot be resumed from (None: it verifies). Refuses at once,
        with the list, when none verifies."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        root = self.output / "checkpoints"
        candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
        if not candidates:
            raise MissingFileError(f"nothing to resume in {self.output}: no complete checkpoint in checkpoints/")
        # one process checks (checksums read every byte), all load the same checkpoint
        problems = broadcast_object_list(
            [[self._checkpoint_problem(p) for p in candidates] if acc.is_main_process else None])[0]
        if all(problems):
            listed = "; ".join(f"{p.name}: {why}" for p, why in zip(candidates, problems))
            raise CorruptFileError(f"nothing to resume in {self.output}: no checkpoint verifies ({listed}); "
                                   "restore one, or start again with --force")
        return list(zip(candidates, problems))

    def _resume_from_checkpoint(self) -> None:
        """Load the newest checkpoint that verifies; name each newer one skipped and why, or refuse with the list."""
        skipped = []
        for path, problem in self._resume_candidates:
            if problem is None:
                try:
                    self.accelerator.load_state(str(path / "trainer"))
                except Exception as e:  # noqa: BLE001 - a checkpoint without a manifest, torn: try the previous
                    problem = f"its trainer state does not load ({type(e).__name__}: {str(e).splitlines()[0]})"
            if problem is None:
                break
            skipped.append(f"{path.name}: {problem}")
            self.log(f"--resume: skipping {path}: {problem}")
        else:
            raise CorruptFileError(f"nothing to resume in {self.output}: no checkpoint verifies "
                                   f"({'; '.join(skipped)}); restore one, or start again with --force")
        self.step = json.loads((path / "trainer" / TRAINER_STATE).read_text())["step"]
        self._rewind_metrics()
        self.log(f"resumed from {path} (step {self.step})" + (f", skipping {len(skipped)} newer damaged "
                                                              f"checkpoint(s)" if skipped else ""))

    def _rewind_metrics(self) -> None:
        """Drop the metrics rows after the resumed step (they will be written again); keep the PTQ baseline of
        step 0 for the final qat.json."""
        path = self.output / "metrics.jsonl"
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut by a kill
                    continue
        rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= self.step]
        if rows and rows[0]["step"] == 0:
            self.initial_validation = {k: v for k, v in rows[0].items() if k.startswith("val_")}
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and path.exists():
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from tqdm.auto import tqdm

        c, acc = self.config, self.accelerator
        metrics_log = (self.output / "metrics.jsonl").open("a") if acc.is_main_process else None

        def record(entry):
            if metrics_log:
                metrics_log.write(json.dumps(entry) + "\n")
                metrics_log.flush()
            if c.log_with:
                acc.log({k: v for k, v in entry.items() if isinstance(v, (int, float))}, step=entry["step"])

        last_val = {}
        if self.step == 0:
            last_val = self.validate()
            record({"step": 0, "fake_quant": True, **last_val})
            self.log("step 0 (post-training quantization): " + _fmt(last_val))
            self.initial_validation = last_val
        quiet = not acc.is_main_process or bool(os.environ.get("TQDM_DISABLE"))
        bar = tqdm(total=c.steps, initial=self.step, disable=quiet, desc=f"QAT {c.format}",
                   unit="step", dynamic_ncols=True)
        try:
            while self.step < c.steps:
                t_start = time.perf_counter()
                try:
                    metrics = self.train_step()
                except FormatError as e:  # weights blew up beyond what the format can hold
                    raise self._diverged(self.step + 1, str(e)) from None
                self.step += 1
                metrics["tokens_per_s"] = metrics["tokens"] / max(time.perf_counter() - t_start, 1e-9)
                metrics["peak_mem_mb"] = _peak_memory_mb(self.device)
                if not math.isfinite(metrics["loss"]):
                    raise self._diverged(self.step, f"loss became {metrics['loss']}")
                if self.step % c.eval_every == 0 or self.step == c.steps:
                    last_val = self.validate()
                    metrics.update(last_val)
                record({"step": self.step, "fake_quant": True, **metrics})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                # KL to the teacher when there is one; with a cache, the KD loss
                                **{k: f"{last_val[k]:.4f}" for k in ("val_kl", "val_kd_loss")
                                   if last_val.get(k) is not None and not (k == "val_kd_loss"
                                                                            and last_val.get("val_kl") is not None)})
                bar.update(1)
                if self.step % c.save_every == 0 or self.stop_requested:
                    self.save_checkpoint(last_val)
                if self.stop_requested:
                    raise TrainingStopped(f"stopped at step {self.step} (checkpoint saved); continue with --resume "
                                          f"--output {self.output}")
        finally:
            bar.close()
            if metrics_log:
                metrics_log.close()
        return last_val

    def _diverged(self, step: int, reason: str) -> TrainingError:
        last = sorted((self.output / "checkpoints").glob("step-*"))
        return TrainingError(f"training diverged at step {step} ({reason}); the last good checkpoint is "
                             f"{last[-1] if last else 'none'}: lower --lr or check the data, then --resume")

    # ------------------------------------------------------------------------------------------------ cleanup
    def cleanup(self, final_metrics: dict) -> Path:
        """The run directory itself becomes the final QAT checkpoint: written with its manifest in a temporary
        directory, then moved in file by file, the manifest next to last and qat.json (the mark of a finished
        run) last. The manifest lists the checkpoint's files only, not the checkpoints/ and logs beside them."""
        acc = self.accelerator
        metrics = dict(final_metrics)
        if getattr(self, "initial_validation", None):
            metrics.update({f"ptq_{k}": v for k, v in self.initial_validation.items()})
        tmp = self.output / ".final.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        write_qat_checkpoint(self.student, tmp, self._metadata(metrics), self.tokenizer_dir,
                             prepared_format=self.prepare_report.config.format, accelerator=acc)
        if acc.is_main_process:
            write_manifest(tmp)
            last = {MANIFEST: 1, QAT_JSON: 2}
            for item in sorted(tmp.iterdir(), key=lambda p: last.get(p.name, 0)):
                os.replace(item, self.output / item.name)
            tmp.rmdir()
        acc.wait_for_everyone()
        acc.end_training()
        return self.output


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)


def train(config: TrainConfig, *, resume: bool = False, force: bool = False, log=print) -> Path:
    """Run QAT end to end; returns the output directory (a QAT checkpoint). A clean stop (SIGINT/SIGTERM) raises
    ``TrainingStopped`` after saving a checkpoint."""
    recipe = QATRecipe(config, resume=resume, force=force, log=log)
    try:
        recipe.setup()
        final = recipe.train()
        out = recipe.cleanup(final)
    finally:
        recipe.restore_signal_handlers()
    recipe.log(f"QAT checkpoint: {out}  ({_fmt(final)})")
    return out
