"""``--mixed-precision``: what it resolves to on this host, and why (the trainer, the teacher's dtype and the
training-memory planner all ask ``choose_precision``)."""

from __future__ import annotations

from dataclasses import dataclass

from gemma3_qat.errors import InputError

MIXED_PRECISION = ("auto", "no", "bf16")


# On a CPU, bf16 autocast pays where the matmuls are wide enough for bf16's speed to outweigh its casts: measured
# train steps (benchmarks/train_step.py, docs/results.md) at hidden 256 (the embedded model) 0.65x fp32's time,
# at 64 (the test fixtures) 1.18x. Below this width ``auto`` stays fp32.
BF16_CPU_MIN_HIDDEN = 256


def cpu_bf16_support() -> str | None:
    """The instructions with which this CPU computes bf16 matmuls natively, as torch reports them (AMX,
    AVX512-BF16, or bf16 on Arm via oneDNN), or None."""
    import platform

    import torch

    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    if platform.machine().lower() in ("arm64", "aarch64") and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "Arm BF16"
    return None


@dataclass(frozen=True)
class Precision:
    """What ``--mixed-precision`` resolves to on this device: ``bf16`` (autocast; the live teacher held in bf16)
    or ``no`` (fp32), and why (the log's first lines say it)."""

    mode: str
    why: str

    @property
    def teacher_dtype(self):
        import torch

        return torch.bfloat16 if self.mode == "bf16" else torch.float32


def choose_precision(setting: str, *, cuda: bool, hidden: int | None = None,
                     cpu_bf16: str | None | bool = True) -> Precision:
    """``--mixed-precision``: ``bf16`` and ``no`` force; ``auto`` is bf16 on CUDA, and on a CPU that computes bf16
    matmuls natively (``cpu_bf16_support``: pass its answer, or True to ask it) for a model at least
    ``BF16_CPU_MIN_HIDDEN`` wide (``hidden``; None: assume wide enough); fp32 elsewhere. The memory model asks
    this too."""
    if setting not in MIXED_PRECISION:
        raise InputError(f"--mixed-precision must be auto, no or bf16, got {setting!r}")
    if setting != "auto":
        return Precision(setting, f"--mixed-precision {setting}")
    if cuda:
        return Precision("bf16", "auto: bf16 autocast on CUDA")
    support = cpu_bf16_support() if cpu_bf16 is True else cpu_bf16
    if not support:
        return Precision("no", "auto: fp32 (this CPU has no native bf16 matmuls: no AMX, AVX512-BF16 or Arm BF16)")
    if hidden is not None and hidden < BF16_CPU_MIN_HIDDEN:
        return Precision("no", f"auto: fp32 (the CPU has {support}, but at hidden size {hidden} bf16's casts cost more "
                               f"than its matmuls save; bf16 from {BF16_CPU_MIN_HIDDEN})")
    return Precision("bf16", f"auto: bf16 autocast (this CPU computes bf16 matmuls with {support})")


def mixed_precision_for(setting: str, cuda: bool, hidden: int | None = None) -> str:
    """The mode of ``choose_precision`` (``bf16`` or ``no``)."""
    return choose_precision(setting, cuda=cuda, hidden=hidden).mode
