"""Start from a checkpoint that stores QAT values in bf16 (Google's ``gemma-3-*-qat-q4_0-unquantized``).

``recover_checkpoint`` reads such a checkpoint tensor by tensor and describes its lattice (``RecoveredCheckpoint``:
per quantizable tensor a ``TensorLattice`` from ``gemma3_qat.lattice``, or "not on a lattice"); it refuses, in
one line, a checkpoint whose matmuls are not on the lattice of the asked format, naming the fraction of blocks
that are and the layout the weights look like instead (an ordinary checkpoint, int4-channel, another group size).

``write_recovered_checkpoint`` turns it into a QAT checkpoint directory, the form everything else in the toolkit
already exports exactly (``export --to gguf``, ``--to safetensors``) and trains from (``train --model``): the latent
fp32 weights are the recovered lattice values ``k * D``, and ``qat.json`` says ``int4-block`` (or
``int4-channel``), with ``quantize_embeddings`` when the embedding is on the lattice too. This route is exact
because a block recovered with its extreme at -8 is a fixed point of Q4_0's rule (see ``gemma3_qat.lattice``):
re-quantizing the latent values gives back the recovered codes and scales bit for bit. Blocks whose extreme is
+7 or -7 (another grid) are not, so the writer refuses them (they need the codes written directly:
``gemma3_qat.lattice.recovering_format``). The other tensors (norms, an embedding off the lattice, a vision tower)
are copied as stored. Written into a temporary directory renamed when complete, with a ``manifest.json``:
a refusal half-way leaves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemma3_qat import __version__
from gemma3_qat.checkpoint import QAT_JSON, Checkpoint, QATMetadata, ShardWriter, atomic_directory, copy_tokenizer_files
from gemma3_qat.errors import InputError
from gemma3_qat.layout import MATMUL_ROLES, tensor_role
from gemma3_qat.formats import get_format
from gemma3_qat.integrity import write_manifest
from gemma3_qat.lattice import LAYOUTS, RULES, TensorLattice, lattice_fractions, looks_like, recover_tensor

_STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}  # safetensors dtypes recovery reads
MIN_FRACTION = 0.999  # blocks of every matmul that must reproduce their stored values (the acceptance)


class LatticeError(InputError):
    """A checkpoint whose weights are not on the asked int4 lattice."""


@dataclass
class RecoveredCheckpoint:
    """What recovery found in a checkpoint: per quantizable tensor (matmuls, embedding) its ``TensorLattice``.

    ``off_lattice``: quantizable tensors that are not on the lattice (only the embedding is allowed to be: it is
    then kept as stored and exported as the user chooses); ``quantize_embeddings``: the embedding is on it.
    """

    source: Path
    format: str
    rule: str
    tensors: dict[str, TensorLattice] = field(default_factory=dict)
    off_lattice: list[str] = field(default_factory=list)
    quantize_embeddings: bool = False

    @property
    def groups(self) -> int:
        return sum(t.groups for t in self.tensors.values())

    @property
    def on_lattice(self) -> int:
        return sum(t.on_lattice for t in self.tensors.values())

    @property
    def fraction(self) -> float:
        return self.on_lattice / self.groups if self.groups else 0.0

    @property
    def ambiguous(self) -> int:
        return sum(t.ambiguous for t in self.tensors.values())

    @property
    def not_fixed(self) -> int:
        return sum(t.not_fixed for t in self.tensors.values())

    def summary(self) -> dict:
        """JSON-able totals (recorded in the written checkpoint's ``qat.json`` metrics, for inspect and the
        model card)."""
        worst = max((t.worst_error for t in self.tensors.values()), default=0.0)
        return {"source": str(self.source), "format": self.format, "rule": self.rule, "groups": self.groups,
                "on_lattice": self.on_lattice, "fraction": self.fraction, "several_scales": self.ambiguous,
                "extreme_not_-8": self.not_fixed, "worst_error_off_lattice": worst,
                "quantize_embeddings": self.quantize_embeddings, "off_lattice_tensors": self.off_lattice}

    def lines(self) -> list[str]:
        unit = "blocks" if self.format == "int4-block" else "rows"
        head = (f"{self.source}: {self.on_lattice:,}/{self.groups:,} {unit} on the {self.format} lattice "
                f"({100 * self.fraction:.3f}%), {self.ambiguous:,} with several consistent scales (rule {self.rule})")
        tail = [f"not on a lattice (kept as stored): {name}" for name in self.off_lattice]
        return [head, *(t.line() for t in self.tensors.values()), *tail]


def _stored_dtype(ckpt: Checkpoint, name: str) -> torch.dtype | None:
    return _STORED.get(ckpt.dtype(name))


def _refusal(ckpt: Checkpoint, name: str, weight: torch.Tensor, lattice: TensorLattice | None, fmt: str,
             min_fraction: float) -> LatticeError:
    """The one-line refusal: the fraction that is on the lattice, and what the weights look like instead."""
    unit = "blocks" if fmt == "int4-block" else "rows"
    if lattice is None:
        return LatticeError(f"{ckpt.path}: {name} is {ckpt.dtype(name)}, not bf16/f16/f32 values of an int4 "
                            "lattice; lattice recovery needs the checkpoint as it was saved")
    have = (f"{ckpt.path}: only {100 * lattice.fraction:.2f}% of the {unit} of {name} lie on an {fmt} lattice "
            f"(need {100 * min_fraction:.1f}%)")
    best, best_fraction = looks_like(lattice_fractions(weight))
    if best_fraction < min_fraction:
        return LatticeError(f"{have}: not a QAT checkpoint (an ordinary one); export it without lattice recovery "
                            "(export --to gguf --type q4_0) or train it (train --model)")
    if best in LAYOUTS:
        return LatticeError(f"{have}: it looks like {best} ({100 * best_fraction:.1f}% of its "
                            f"{'blocks' if best == 'int4-block' else 'rows'} on that lattice); recover it with "
                            f"--format {best}")
    return LatticeError(f"{have}: it looks like {best} ({100 * best_fraction:.1f}% on that lattice), which no "
                        f"format of this toolkit holds ({', '.join(LAYOUTS)}); export it without lattice recovery")


def _quantizable(name: str) -> str | None:
    role = tensor_role(name)
    return role if role in MATMUL_ROLES or role == "embedding" else None


Sink = Callable[[str, torch.Tensor, "TensorLattice | None"], None]  # (name, stored tensor, its lattice or None)


def _recover_all(ckpt: Checkpoint, fmt: str, rule: str, min_fraction: float, keep: bool,
                 sink: Sink | None = None) -> RecoveredCheckpoint:
    """Read every tensor once: recover the quantizable ones, refuse a matmul off the lattice, hand each tensor
    to ``sink`` (the writer) in checkpoint order."""
    if fmt not in LAYOUTS:
        get_format(fmt)  # an unknown name: the formats' own error
        raise LatticeError(f"lattice recovery produces {' or '.join(LAYOUTS)}, not {fmt}")
    if rule not in RULES:
        raise LatticeError(f"unknown tie rule {rule!r}; choose one of: {', '.join(RULES)}")
    result = RecoveredCheckpoint(ckpt.path, fmt, rule)
    for name in ckpt.names():
        weight = ckpt.read(name)
        role = _quantizable(name)
        lattice = None
        if role is not None:
            dtype = _stored_dtype(ckpt, name)
            if dtype is not None:
                lattice = recover_tensor(weight, fmt, name=name, rule=rule, stored_dtype=dtype,
                                         keep=keep or sink is not None)
            if lattice is None or lattice.fraction < min_fraction:
                if role != "embedding":
                    raise _refusal(ckpt, name, weight, lattice, fmt, min_fraction)
                result.off_lattice.append(name)
                lattice = None
            else:
                result.quantize_embeddings |= role == "embedding"
                result.tensors[name] = lattice
        if sink is not None:
            sink(name, weight, lattice)
        if lattice is not None and not keep:
            lattice.quantized = None  # counts only: a 27B checkpoint's codes do not stay in memory
    if not result.tensors:
        raise LatticeError(f"{ckpt.path} has no language-model matmul weights (q/k/v/o, gate/up/down): not a "
                           "Gemma 3 checkpoint to recover")
    return result


def recover_checkpoint(checkpoint: str | Path, fmt: str = "int4-block", *, rule: str = "q4_0",
                       min_fraction: float = MIN_FRACTION, keep: bool = False) -> RecoveredCheckpoint:
    """Describe the int4 lattice of ``checkpoint``'s language-model matmuls and embedding (reads every tensor).

    Raises ``LatticeError`` (one line) when a matmul has fewer than ``min_fraction`` of its blocks on the lattice;
    an embedding off it is listed in ``off_lattice``. ``keep``: keep each tensor's ``QuantizedWeight``.
    """
    return _recover_all(Checkpoint(checkpoint), fmt, rule, min_fraction, keep)


def recovered_metadata(result: RecoveredCheckpoint) -> QATMetadata:
    """The ``qat.json`` of the QAT checkpoint equivalent to ``result``: the teacher defaults to the source."""
    modules = [name.removesuffix(".weight") for name in result.tensors]
    return QATMetadata(format=result.format, quantize_embeddings=result.quantize_embeddings,
                       quantized_modules=modules, teacher=str(result.source), steps=0,
                       metrics={"recovered_lattice": result.summary()}, gemma3_qat_version=__version__)


def write_recovered_checkpoint(checkpoint: str | Path, output: str | Path, fmt: str = "int4-block", *,
                               rule: str = "q4_0", min_fraction: float = MIN_FRACTION, force: bool = False,
                               max_shard_bytes: int = 2 * 10**9,
                               log: Callable[[str], None] | None = print) -> RecoveredCheckpoint:
    """Write the QAT checkpoint equivalent to ``checkpoint``'s recovered lattice into the directory ``output``.

    Quantized tensors become fp32 ``k * D`` (the recovered values; exact re-quantization, see the module
    docstring); everything else is copied in its stored dtype. Refused before anything is final (the temporary
    directory is removed): what ``recover_checkpoint`` refuses, blocks with a +-7 extreme, and an existing
    ``output`` without ``force``.
    """
    ckpt = Checkpoint(checkpoint)
    ckpt.require_tokenizer_model()
    with atomic_directory(output, force=force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, {"format": "pt", "gemma3_qat.version": __version__,
                                                     "gemma3_qat.recovered_from": str(ckpt.path)})

        def sink(name: str, weight: torch.Tensor, lattice: TensorLattice | None) -> None:
            if lattice is None:
                writer.add(name, weight)
                return
            if lattice.not_fixed:
                raise LatticeError(f"{name}: {lattice.not_fixed:,} blocks have a +-7 extreme, a lattice Q4_0's "
                                   "rule never produces, so no latent weights reproduce them; export the codes "
                                   "directly (export --recover-lattice)")
            writer.add(name, get_format(fmt).dequantize(lattice.quantized))

        result = _recover_all(ckpt, fmt, rule, min_fraction, False, sink)
        writer.close()
        config = dict(ckpt.config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(ckpt.path, tmp)
        (tmp / QAT_JSON).write_text(recovered_metadata(result).to_json())
        write_manifest(tmp)
    if log:
        for line in result.lines()[:1] + [f"wrote {output}"]:
            log(line)
    return result
