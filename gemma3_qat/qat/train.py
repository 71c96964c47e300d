"""QAT by knowledge distillation: the student (a fake-quantized copy) learns the frozen teacher's probabilities.

    gemma3-qat train --format int4-block                       # the embedded default model and data, on the CPU
    accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml -m gemma3_qat.cli train \\
        --recipe recipes/gemma3-27b-int4-block.yaml

Features and their flags (every recipe key is a flag too):
* formats ``--format int4-block|int4-channel|sfp8``, ``--quantize-embeddings`` (the tied table, lookup and head)
* KD ``--kd full|sampled|topk``, ``--kd-k``, ``--kd-temperature``, ``--kd-alpha`` (mix in the next-token loss)
* teacher: live (frozen, eval mode; bf16 on CUDA, fp32 on CPU) or ``--teacher-cache DIR`` (no teacher in memory)
* data: ``--data FILE[:WEIGHT]`` (jsonl/json/parquet/txt or hub ids; ``text`` or chat ``messages``), packing,
  ``--assistant-only``
* AdamW, warmup + cosine, gradient clipping, gradient accumulation, bf16 autocast on CUDA, gradient checkpointing
* accelerate: one process on CPU or GPU, DDP, FSDP (configs in ``recipes/accelerate/``)
* checkpoints every ``--save-every`` steps and on SIGINT/SIGTERM, atomic, each a valid QAT checkpoint; ``--resume``
* logs: progress bar, ``metrics.jsonl`` (loss, KD and CE apart, lr, tokens/s, grad norm, peak memory), periodic
  validation (KL to teacher, top-1 agreement, perplexity); ``--log-with tensorboard|wandb``

Under bf16 autocast the fake-quantized weight is rounded to bf16 before the matmul: int4 values ``k * D`` need up
to 14 significant bits, so training then sees values within 2**-9 relative of the runtime's (see the README).
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from gemma3_qat import __version__
from gemma3_qat.checkpoint import QAT_JSON, QATMetadata, copy_tokenizer_files
from gemma3_qat.formats import FormatError, get_format
from gemma3_qat.qat.data import DataSource, MixtureSampler, build_data
from gemma3_qat.qat.distill import KDConfig, agreement_metrics, distillation_loss, shift_for_next_token, sparse_target
from gemma3_qat.errors import Gemma3QATError, InputError, MissingFileError, OutputExistsError


class TrainingError(Gemma3QATError, RuntimeError):
    """Training cannot go on (NaN loss, a mismatched teacher cache, ...); the message says what to do."""


@dataclass
class TrainConfig:
    format: str = "int4-block"
    model: str | None = None  # local dir or hub id; None = the embedded default model
    teacher: str | None = None  # default: the model
    quantize_embeddings: bool = False
    data: list[str] = field(default_factory=list)  # FILE[:WEIGHT]; empty = the embedded sample data
    validation_percent: float = 5.0
    assistant_only: bool = False
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step, all processes together
    micro_batch_size: int = 8  # sequences per forward on one process (gradient accumulation makes up the rest)
    steps: int = 5000
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    kd: str = "full"
    kd_k: int = 256
    kd_temperature: float = 1.0
    kd_alpha: float = 0.0
    teacher_cache: str | None = None
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, none on CPU
    fake_quant_cache: str = "auto"  # reuse fake-quant values between optimizer steps; auto: off under FSDP
    eval_every: int = 50
    eval_rows: int = 32
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    output: str | None = None
    log_with: list[str] = field(default_factory=list)

    def __post_init__(self):
        get_format(self.format)
        KDConfig(self.kd, self.kd_k, self.kd_temperature, self.kd_alpha, self.seed)  # validates
        for name in ("seq_len", "batch_size", "micro_batch_size", "eval_rows", "save_every", "eval_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.fake_quant_cache not in ("auto", "on", "off"):
            raise InputError(f"--fake-quant-cache must be auto, on or off, got {self.fake_quant_cache!r}")
        if self.steps < 0:
            raise InputError(f"--steps must be 0 (post-training quantization only) or more, got {self.steps}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise InputError(f"--mixed-precision must be auto, no or bf16 (fp16 overflows in Gemma 3), got "
                             f"{self.mixed_precision!r}")

    @property
    def kd_config(self) -> KDConfig:
        return KDConfig(self.kd, self.kd_k, self.kd_temperature, self.kd_alpha, self.seed)

    @classmethod
    def from_recipe(cls, path: str | Path | None, **overrides) -> "TrainConfig":
        """A recipe YAML (``base: other.yaml`` inherits) with flag overrides on top (None = not given).

        A recipe value may depend on the format, as a mapping from format name to value (``lr: {int4-block: 1e-4,
        sfp8: 3e-5}``): the run's ``format`` picks one."""
        values: dict = {}
        if path is not None:
            values = load_recipe(Path(path))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown recipe keys {unknown}; known keys: {', '.join(sorted(known))}")
        fmt = values.get("format", cls.format)
        for key, value in values.items():
            if isinstance(value, dict):
                if fmt not in value:
                    raise InputError(f"recipe key {key!r} gives values for {', '.join(map(str, value))} but not for "
                                     f"format {fmt!r}: add one, or pass --{key.replace('_', '-')}")
                values[key] = value[fmt]
        return cls(**values)


def load_recipe(path: Path) -> dict:
    if not path.exists():
        raise MissingFileError(f"recipe {path} does not exist; the recipes are in recipes/")
    values = yaml.safe_load(path.read_text()) or {}
    base = values.pop("base", None)
    if base:
        values = {**load_recipe(path.parent / base), **values}
    return values


def default_output(config: TrainConfig) -> Path:
    name = Path(config.model).name if config.model else "default"
    return Path("runs") / f"{name}-{config.format}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run(root: Path = Path("runs")) -> Path | None:
    runs = [p.parent for p in root.glob(f"*/{QAT_JSON}")]
    return max(runs, key=lambda p: (p / QAT_JSON).stat().st_mtime) if runs else None


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class QATRecipe:
    """setup -> train -> cleanup. One instance per run."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, force: bool = False, log=print):
        self.config, self.resume, self.force, self.log = config, resume, force, log
        self.stop_requested = False

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from gemma3_qat.assets import sample_data_specs
        from gemma3_qat.models import load_gemma3, resolve_model
        from gemma3_qat.qat.prepare import prepare
        from gemma3_qat.tokenizer import load_tokenizer

        import datasets

        datasets.disable_progress_bars()  # the `data:` lines report what was loaded
        # save_state drops the tied head (lm_head = embed_tokens) and warns each time: expected for Gemma 3
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
        c = self.config
        mixed = c.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = acc = Accelerator(mixed_precision=mixed, log_with=c.log_with or None,
                                             project_dir=c.output)
        if not acc.is_main_process:
            self.log = lambda *_: None  # one process speaks
        self.device = acc.device
        self.is_fsdp = acc.distributed_type.name == "FSDP"
        self.output = self._check_output()
        set_seed(c.seed)

        self.model_source = resolve_model(c.model)
        self.teacher_source = resolve_model(c.teacher) if c.teacher else self.model_source
        self.tokenizer_dir = _local_dir(self.model_source)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.data_sources = [DataSource.parse(s) for s in (c.data or sample_data_specs())]
        self.train_data, self.valid_data = build_data(
            self.data_sources, self.tokenizer, c.seq_len, validation_percent=c.validation_percent,
            assistant_only=c.assistant_only, log=self.log)
        self.sampler = MixtureSampler(self.train_data, [s.weight for s in self.data_sources], c.seed)
        per_step = acc.num_processes * c.micro_batch_size
        if c.batch_size % per_step:
            raise InputError(f"--batch-size {c.batch_size} must be a multiple of processes x --micro-batch-size "
                             f"= {acc.num_processes} x {c.micro_batch_size}")
        self.accumulation = c.batch_size // per_step

        student = load_gemma3(self.model_source, dtype=torch.float32)  # fp32 master (latent) weights
        context = student.config.get_text_config().max_position_embeddings
        if c.seq_len > context:
            raise InputError(f"--seq-len {c.seq_len} is beyond the model's context of {context} tokens")
        cache = {"auto": not self.is_fsdp, "on": True, "off": False}[c.fake_quant_cache]
        self.prepare_report = prepare(student, c.format, quantize_embeddings=c.quantize_embeddings, cache=cache)
        if c.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False

        self._create_output()  # model, data and flags are valid: now the run directory may be written
        self.teacher = None
        self.teacher_cache = None
        if c.teacher_cache:
            from gemma3_qat.qat.teacher_cache import TeacherCache

            self.teacher_cache = TeacherCache.open(c.teacher_cache, expected=self._cache_fingerprint())
        else:
            teacher_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.teacher = load_gemma3(self.teacher_source, dtype=teacher_dtype).to(self.device).eval()
            self.teacher.requires_grad_(False)

        decay = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, betas=(0.9, 0.95))
        # The schedule counts optimizer steps of the global batch. accelerate's prepared scheduler would step once
        # per process per call (it assumes per-process batches): keep it ours, and checkpoint it with the rest.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        acc.register_for_checkpointing(self.scheduler)
        self.student, self.optimizer = acc.prepare(student, optimizer)
        self.step = 0
        if self.resume:
            self._load_last_checkpoint()
        if acc.is_main_process:
            (self.output / "train-config.yaml").write_text(yaml.safe_dump(asdict(c), sort_keys=False))
        if c.log_with:
            acc.init_trackers("gemma3-qat", config=asdict(c))
        self._install_signal_handlers()

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def _check_output(self) -> Path:
        c = self.config
        if c.output is None:
            previous = latest_run() if self.resume else None
            c.output = str(previous or default_output(c))
            if previous:
                self.log(f"resuming the most recent run: {previous}")
        out = Path(c.output)
        holds_run = (out / "train-config.yaml").exists()
        if holds_run and not (self.resume or self.force):
            raise OutputExistsError(f"{out} already holds a training run; pass --resume to continue it or --force to "
                                  "replace it")
        if self.resume and not holds_run:
            raise MissingFileError(f"nothing to resume in {out}: it holds no training run")
        if holds_run and self.resume:
            previous = yaml.safe_load((out / "train-config.yaml").read_text())
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

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass

    # ------------------------------------------------------------------------------------------------ one step
    def _targets(self, rows: torch.Tensor, input_ids: torch.Tensor):
        """(teacher_logits or None, sparse target or None), aligned with the shifted labels."""
        kd = self.config.kd_config
        if self.teacher_cache is not None:
            return None, self.teacher_cache.target(rows, split="train", device=self.device)
        with torch.no_grad(), self.accelerator.autocast():
            logits = self.teacher(input_ids=input_ids).logits[:, :-1]
        if kd.mode == "full":
            return logits, None
        return None, sparse_target(logits, kd, sample_ids=rows)

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
            teacher_logits, target = self._targets(micro, input_ids)
            sync = i == self.accumulation - 1
            with acc.no_sync(self.student) if not sync else nullcontext():
                with acc.autocast():
                    logits = self.student(input_ids=input_ids).logits
                logits, shifted = shift_for_next_token(logits, labels)
                loss, parts = distillation_loss(logits, shifted, c.kd_config, teacher_logits=teacher_logits,
                                                target=target, normalizer=normalizer)
                acc.backward(loss)
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += float(v)
        grad_norm = acc.clip_grad_norm_(self.student.parameters(), c.max_grad_norm)
        self.optimizer.step()
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
        c, acc = self.config, self.accelerator
        rows = torch.arange(min(c.eval_rows, len(self.valid_data)))
        if len(rows) == 0:
            return {}
        mine = rows[acc.process_index::acc.num_processes]
        self.student.eval()
        sums = torch.zeros(4, device=self.device)  # kl, top1, nll, count
        for micro in mine.split(c.micro_batch_size):
            input_ids = self.valid_data.input_ids[micro].to(self.device)
            labels = self.valid_data.labels[micro].to(self.device)
            with acc.autocast():
                logits = self.student(input_ids=input_ids).logits
            logits, shifted = shift_for_next_token(logits, labels)
            if self.teacher is not None:
                with acc.autocast():
                    t_logits = self.teacher(input_ids=input_ids).logits[:, :-1]
                m = agreement_metrics(logits, t_logits, shifted)
                sums += torch.tensor([m["kl_sum"], m["top1_sum"], m["nll_sum"], m["count"]], device=self.device)
            else:  # teacher cache: agreement on the cached top-1, cross-entropy to the cached target
                target = self.teacher_cache.target(micro, split="valid", device=self.device)
                top1 = self.teacher_cache.top1(micro, split="valid", device=self.device)
                mask = shifted != -100
                kd, _ = distillation_loss(logits, shifted, c.kd_config, target=target, normalizer=1.0)
                nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), shifted, ignore_index=-100,
                                                        reduction="sum")
                agree = ((logits.argmax(-1) == top1) & mask).sum()
                sums += torch.stack([kd.float(), agree.float(), nll.float(), mask.sum().float()])
        sums = acc.reduce(sums, reduction="sum")
        n = max(float(sums[3]), 1.0)
        key = "val_kl" if self.teacher is not None else "val_kd_cache_ce"
        return {key: float(sums[0]) / n, "val_top1": float(sums[1]) / n, "val_ppl": math.exp(float(sums[2]) / n)}

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _metadata(self, metrics: dict) -> QATMetadata:
        c = self.config
        return QATMetadata(
            format=c.format, quantize_embeddings=c.quantize_embeddings,
            quantized_modules=self.prepare_report.quantized, teacher=self.teacher_source,
            data=[f"{s.path}:{s.weight:g}" for s in self.data_sources], steps=self.step,
            kd=c.kd if c.steps else None, metrics=metrics, gemma3_qat_version=__version__)

    def _write_qat_checkpoint(self, directory: Path, metrics: dict) -> None:
        """Student latent weights (master dtype), config, tokenizer and qat.json into ``directory``."""
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.student)
        unwrapped = acc.unwrap_model(self.student)
        if acc.is_main_process:
            unwrapped.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
            copy_tokenizer_files(self.tokenizer_dir, directory)
            (directory / QAT_JSON).write_text(self._metadata(metrics).to_json())

    def save_checkpoint(self, metrics: dict) -> Path:
        """checkpoints/step-NNNNNN: a QAT checkpoint plus the trainer state; written to a temp dir, then renamed.
        The previous good checkpoints stay until the new one is complete."""
        acc = self.accelerator
        root = self.output / "checkpoints"
        final = root / f"step-{self.step:06d}"
        tmp = root / f".step-{self.step:06d}.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        self._write_qat_checkpoint(tmp, metrics)
        acc.save_state(str(tmp / "trainer"))
        if acc.is_main_process:
            (tmp / "trainer" / "trainer_state.json").write_text(json.dumps({"step": self.step, "seed": self.config.seed}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            done = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in done[:-self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _load_last_checkpoint(self) -> None:
        done = sorted(p for p in (self.output / "checkpoints").glob("step-*") if (p / "trainer").is_dir())
        if not done:
            raise MissingFileError(f"nothing to resume in {self.output}: no complete checkpoint in checkpoints/")
        last = done[-1]
        self.accelerator.load_state(str(last / "trainer"))
        self.step = json.loads((last / "trainer" / "trainer_state.json").read_text())["step"]
        self.log(f"resumed from {last} (step {self.step})")

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
                            **({"val_kl": f"{last_val['val_kl']:.4f}"} if "val_kl" in last_val else {}))
            bar.update(1)
            if self.step % c.save_every == 0 or self.stop_requested:
                self.save_checkpoint(last_val)
            if self.stop_requested:
                bar.close()
                raise KeyboardInterrupt(f"stopped at step {self.step}; continue with --resume --output {self.output}")
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
        """The run directory itself becomes the final QAT checkpoint (files moved in one by one, qat.json last)."""
        acc = self.accelerator
        metrics = dict(final_metrics)
        if getattr(self, "initial_validation", None):
            metrics.update({f"ptq_{k}": v for k, v in self.initial_validation.items()})
        tmp = self.output / ".final.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        self._write_qat_checkpoint(tmp, metrics)
        if acc.is_main_process:
            for item in sorted(tmp.iterdir(), key=lambda p: p.name == QAT_JSON):
                os.replace(item, self.output / item.name)
            tmp.rmdir()
        acc.wait_for_everyone()
        acc.end_training()
        return self.output


def _local_dir(source: str) -> str:
    """A local directory with the checkpoint's tokenizer files (downloads them for a hub id)."""
    if Path(source).exists():
        return source
    from huggingface_hub import snapshot_download

    from gemma3_qat.checkpoint import TOKENIZER_FILES
    from gemma3_qat.models import hub_error

    try:
        return snapshot_download(source, allow_patterns=list(TOKENIZER_FILES))
    except Exception as e:  # offline, unknown id, gated
        raise hub_error(source, e) from None


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def train(config: TrainConfig, *, resume: bool = False, force: bool = False, log=print) -> Path:
    """Run QAT end to end; returns the output directory (a QAT checkpoint)."""
    recipe = QATRecipe(config, resume=resume, force=force, log=log)
    recipe.setup()
    final = recipe.train()
    out = recipe.cleanup(final)
    recipe.log(f"QAT checkpoint: {out}  ({_fmt(final)})")
    return out
