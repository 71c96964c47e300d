"""The training knobs: ``TrainConfig``, one declaration per knob (its default, its help, its flag).

Every field is a recipe key and a ``gemma3-qat train`` flag (``--seq-len`` for ``seq_len``); the CLI builds its
options from the fields (``knobs``), so a new knob is one field here. A recipe value may depend on the format, as
a mapping from format name to value (``lr: {int4-block: 1e-4, sfp8: 3e-5}``): the run's ``format`` picks one.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from gemma3_qat.errors import InputError
from gemma3_qat.formats import get_format
from gemma3_qat.qat.distill import KDConfig
from gemma3_qat.qat.precision import MIXED_PRECISION
from gemma3_qat.qat.recipes import load_recipe

PTQ_INITS = ("rtn", "imatrix")


def knob(default=None, help: str = "", *, flag: tuple[str, ...] = (), factory=None):
    """A ``TrainConfig`` field with its help text and, where it is not ``--name-with-dashes``, its flag."""
    meta = {"help": help, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    format: str = knob("int4-block", "int4-block, int4-channel, sfp8, q4_k_m or a llama.cpp lattice (q4_k, q6_k, q5_0, "
                                          "q8_0-lattice); gemma3-qat formats lists them.", flag=("--format", "-f"))
    model: str | None = knob(None, "Checkpoint to start from: local HF dir, .gguf file or hub id. Default: the "
                                   "embedded model.")
    teacher: str | None = knob(None, "Unquantized reference (dir, .gguf or hub id). Default: --model.")
    quantize_embeddings: bool = knob(False, "Also fake-quantize the tied embedding (lookup and output head).",
                                     flag=("--quantize-embeddings/--no-quantize-embeddings",))
    data: list[str] = knob(help="FILE[:WEIGHT] (.jsonl/.json/.parquet/.txt or hub id), repeatable. Default: the "
                                "embedded sample data.", factory=list)
    validation_percent: float = knob(5.0, "Share of the data held out for validation (deterministic split).")
    assistant_only: bool = knob(False, "Chat data: train on the model's turns only.",
                                flag=("--assistant-only/--all-tokens",))
    seq_len: int = knob(256, "Packed sequence length in tokens.")
    batch_size: int = knob(8, "Sequences per optimizer step (all processes).")
    micro_batch_size: int = knob(8, "Sequences per forward on one process (gradient accumulation makes up the "
                                    "rest).")
    steps: int = knob(5000, "Optimizer steps (0 = post-training quantization only).")
    lr: float = knob(1e-5, "Peak learning rate (AdamW).")
    min_lr_ratio: float = knob(0.1, "Final learning rate of the cosine decay, relative to --lr.")
    warmup_steps: int = knob(100, "Linear warmup steps before the cosine decay.")
    weight_decay: float = knob(0.0, "AdamW weight decay on matrices.")
    vector_lr_mult: float = knob(1.0, "Learning rate of the norm gains (never quantized), relative to --lr; 0 "
                                      "freezes them.")
    embedding_lr_mult: float = knob(1.0, "Learning rate of the token embedding (also the tied head), relative to "
                                         "--lr; 0 freezes it.")
    max_grad_norm: float = knob(1.0, "Gradient clipping norm.")
    kd: str = knob("full", "Distillation target: full, sampled (the report's), topk.", flag=("--kd",))
    kd_k: int = knob(256, "Ids per position for sampled/topk.", flag=("--kd-k",))
    kd_temperature: float = knob(1.0, "KD temperature.", flag=("--kd-temperature",))
    kd_alpha: float = knob(0.0, "Weight of the next-token loss.", flag=("--kd-alpha",))
    teacher_cache: str | None = knob(None, "Train from this teacher cache (no live teacher).")
    gradient_checkpointing: bool = knob(False, "Recompute activations in backward.",
                                        flag=("--gradient-checkpointing/--no-gradient-checkpointing",))
    mixed_precision: str = knob("auto", "auto (bf16 autocast on CUDA and on CPUs with native bf16 matmuls, for models at least "
                                               "256 wide; fp32 elsewhere), bf16 or no.")
    fake_quant_cache: str = knob("auto", "Reuse fake-quant values between optimizer steps: auto (on, off under "
                                         "FSDP), on or off.")
    scale_grad: float = knob(0.0, "int4: the scales learn too (LSQ's gradient through the weight that sets each "
                                  "scale), times this; 0 = plain straight-through. Exports stay exact.")
    ptq_init: str = knob("rtn", "int4: where QAT starts. rtn (round-to-nearest Q4_0) or imatrix (llama.cpp's "
                                "imatrix-weighted scale search on the training rows, realised on the rule).")
    eval_every: int = knob(50, "Validate every N steps.")
    eval_rows: int = knob(32, "Validation rows.")
    save_every: int = knob(100, "Checkpoint every N steps.")
    keep_checkpoints: int = knob(2, "Checkpoints kept in checkpoints/ (the newest).")
    seed: int = knob(0, "Random seed (data order, sampled-KD noise).")
    output: str | None = knob(None, "Run directory. Default: runs/<model>-<format>-<timestamp>/.",
                              flag=("--output", "-o"))
    log_with: list[str] = knob(help="accelerate tracker: tensorboard, wandb.", factory=list)

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
        frozen = "0 freezes those weights"
        for name, zero in (("vector_lr_mult", frozen), ("embedding_lr_mult", frozen),
                           ("scale_grad", "0: straight-through only")):
            if not (getattr(self, name) >= 0):
                raise InputError(f"{name} must be >= 0 ({zero}), got {getattr(self, name)!r}")
        if self.ptq_init not in PTQ_INITS:
            raise InputError(f"ptq_init must be one of {', '.join(PTQ_INITS)}, got {self.ptq_init!r}")
        if self.ptq_init != "rtn":
            from gemma3_qat.qat.ptq_init import searchable

            searchable(self.format)
        if self.mixed_precision not in MIXED_PRECISION:
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
        if any(isinstance(v, dict) for v in values.values()):
            get_format(fmt)  # an unknown --format is named as such, not as a recipe key without its value
        for key, value in values.items():
            if isinstance(value, dict):
                if fmt not in value:
                    raise InputError(f"recipe key {key!r} gives values for {', '.join(map(str, value))} but not for "
                                     f"format {fmt!r}: add one, or pass --{key.replace('_', '-')}")
                values[key] = value[fmt]
        return cls(**values)


@dataclass(frozen=True)
class Knob:
    """One knob as the CLI offers it: its field name, value type (``int``, ``str``, ``list[str]``, ...), help
    and flag declarations."""

    name: str
    type: object
    help: str
    flags: tuple[str, ...]


def knobs(names: tuple[str, ...] | None = None) -> list[Knob]:
    """The knobs (all, or ``names`` in that order) with their flags: ``--seq-len`` for ``seq_len`` unless the field
    names its own; a bool gets ``--x/--no-x``."""
    hints = typing.get_type_hints(TrainConfig)
    by_name = {f.name: f for f in fields(TrainConfig)}
    out = []
    for name in names or tuple(by_name):
        f = by_name[name]
        kind = hints[name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
            kind = args[0]  # X | None: the flag takes an X
        dashed = "--" + name.replace("_", "-")
        flags = f.metadata.get("flag") or ((f"{dashed}/--no-{dashed[2:]}",) if kind is bool else (dashed,))
        out.append(Knob(name, kind, f.metadata.get("help", ""), tuple(flags)))
    return out


def fake_quant_cache_on(setting: str, is_fsdp: bool) -> bool:
    """``fake_quant_cache: auto``: on, except under FSDP (the memory model asks this too)."""
    return {"auto": not is_fsdp, "on": True, "off": False}[setting]
