"""Checkpoint directories: reading any Gemma 3 HF checkpoint lazily, and the QAT checkpoint layout.

A QAT checkpoint is a plain HF checkpoint of the student's LATENT (unquantized) weights in the master-weight dtype
(``config.json``, ``model.safetensors`` or shards + index, tokenizer files incl. ``tokenizer.model``) plus
``qat.json``: the format, whether the embedding is quantized, the lattice of every quantized tensor (a mixture's
differ by tensor), the teacher, the data, the steps and the metrics.
The exporters apply the format's numerics to the latent weights, which reproduces the final training forward's
codes exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from gemma3_qat.formats import WeightFormat, get_format
from gemma3_qat.layout import role_is_quantized, tensor_role, text_gguf_name
from gemma3_qat.mixtures import mixture_lattices
from gemma3_qat.models import Architecture, NotGemma3Error, architecture_from_config, is_multimodal_gemma3
from gemma3_qat.errors import CorruptFileError, InputError, MissingFileError, OutputExistsError
# the manifest functions are re-exported: the trainer writes and verifies manifests through this module
from gemma3_qat.integrity import (MANIFEST, SINGLE, read_json, read_manifest, verify_manifest,  # noqa: F401
                                  verify_weights, weight_shards, write_manifest)

QAT_JSON = "qat.json"
CHUNK_ELEMENTS = 1 << 24  # weights per streamed row chunk (64 MB in fp32): what an export holds of a tensor
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "preprocessor_config.json",
                   "processor_config.json")
# the attribute ``qat.prepare`` sets on a model it prepares: HF weight name -> lattice (format name) of every weight
# it fake-quantizes, which ``write_qat_checkpoint`` records in qat.json
LATTICES_ATTR = "gemma3_qat_lattices"


@dataclass
class QATMetadata:
    """The contents of ``qat.json``.

    ``lattices``: HF weight name -> lattice (format name) of every tensor trained quantized, as ``qat.prepare``
    chose it (``write_qat_checkpoint`` fills it in from the model); empty in a qat.json written before it existed,
    where ``format`` is every trained tensor's (``Checkpoint.trained_formats``). A mixture (``q4_k_m``) always
    quantizes the tied embedding (its policy's type), so ``quantize_embeddings`` is true for it. ``precision``: what
    ``--mixed-precision`` resolved to on the machine that trained (``auto`` depends on the host); None before.
    """

    format: str
    quantize_embeddings: bool = False
    quantized_modules: list[str] = field(default_factory=list)
    teacher: str | None = None
    data: list[str] = field(default_factory=list)
    steps: int = 0
    kd: str | None = None
    metrics: dict = field(default_factory=dict)
    gemma3_qat_version: str = ""
    lattices: dict[str, str] = field(default_factory=dict)
    precision: str | None = None  # the compute precision training resolved to: "bf16" (autocast) or "no" (fp32)

    def __post_init__(self):
        fmt = get_format(self.format)  # an unknown format is a clear error, naming the valid ones
        if fmt.is_mixture:
            self.quantize_embeddings = True
        if not isinstance(self.lattices, dict):
            raise InputError(f"qat.json: lattices must map tensor names to formats, got "
                             f"{type(self.lattices).__name__}")
        for name, lattice in self.lattices.items():
            if get_format(lattice).is_mixture:
                raise InputError(f"qat.json: {name}: {lattice} is a mixture, not a lattice")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> "QATMetadata":
        data = read_json(path)
        if not isinstance(data, dict):
            raise CorruptFileError(f"{path}: not a JSON object; restore it or train again")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as e:
            raise CorruptFileError(f"{path}: {e}; restore it or train again") from None


# the safetensors dtypes this reader turns into torch tensors
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class Checkpoint:
    """A local Gemma 3 checkpoint directory, read lazily (tensor by tensor, row chunks) from its safetensors.

    Everything is validated before the first tensor is read: the directory's ``manifest.json`` when it has one
    (every file's size; with ``verify``, the SHA-256 of the weight files: seconds per GB, small next to an export),
    the index, and each safetensors header (``integrity.verify_weights``). A torn or bit-flipped checkpoint is refused
    with a ``CorruptFileError`` naming the file, never read into an export.
    """

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            if self.path.exists():
                raise InputError(f"{self.path} is a file, not a checkpoint directory: pass the directory that holds "
                                 "config.json and the safetensors")
            raise MissingFileError(f"checkpoint directory {self.path} does not exist")
        config_path = self.path / "config.json"
        if not config_path.exists():
            raise NotGemma3Error(f"{self.path} has no config.json: not a Hugging Face checkpoint directory")
        self.config = read_json(config_path)
        self.multimodal = is_multimodal_gemma3(self.config, str(self.path))  # refuses any other model_type
        self.qat = QATMetadata.read(self.path / QAT_JSON) if (self.path / QAT_JSON).exists() else None
        self._files = self._weight_files(verify)

    @functools.cached_property
    def architecture(self) -> Architecture:
        """The checkpoint's architecture (``models.architecture_from_config`` of its ``config.json``): what every
        exporter reads instead of the config's keys."""
        return architecture_from_config(self.config, self.path.name, str(self.path / "config.json"))

    def _weight_files(self, verify: bool) -> dict[str, Path]:
        # sizes of every file in the manifest always (a stat each); the weights' checksums when verifying
        self._headers = {self.path / s: h for s, h in verify_weights(self.path, checksums=verify).items()}
        weight_map = weight_shards(self.path)[1]
        if weight_map is not None:
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / SINGLE
        return {name: single for name in self._headers[single][0] if name != "__metadata__"}

    def _entry(self, name: str) -> tuple[dict, int, Path]:
        file = self._files[name]
        header, data_start = self._headers[file]
        return header[name], data_start, file

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[0]["shape"])

    def dtype(self, name: str) -> str:
        return self._entry(name)[0]["dtype"]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A tensor, or a slice of its rows, read with plain file reads: nothing of the file stays mapped in this
        process (a memory map would keep every page read resident: 4 GB of RSS for a 1B fp32 checkpoint)."""
        entry, data_start, file = self._entry(name)
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise InputError(f"{file}: tensor {name!r} is {entry['dtype']}, which this reader does not support "
                             f"({', '.join(SAFETENSORS_DTYPES)}); convert the checkpoint to F32 or BF16")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        if rows is not None:
            first, last, _ = rows.indices(shape[0])
            begin, shape = begin + first * row_bytes, [max(last - first, 0), *shape[1:]]
            end = begin + shape[0] * row_bytes
        out = torch.empty(shape, dtype=dtype)
        with open(file, "rb") as f:
            f.seek(data_start + begin)
            got = f.readinto(memoryview(out.view(torch.uint8).reshape(-1).numpy())) if out.numel() else 0
        if got != end - begin:  # the header was checked against the size: the file changed since
            raise CorruptFileError(f"{file}: tensor {name!r}: read {got:,} of {end - begin:,} bytes (the file "
                                   f"shrank while being read); copy or export it again")
        return out

    def row_chunks(self, name: str, rows: slice | None = None) -> Iterator[torch.Tensor]:
        """fp32 chunks of consecutive rows of a tensor (or of a row range of it), about ``CHUNK_ELEMENTS`` weights
        each: how every exporter streams a tensor (a vector comes in chunks of its elements)."""
        shape = self.shape(name)
        first, last, _ = (rows or slice(None)).indices(shape[0])
        step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
        for start in range(first, last, step):
            yield self.read(name, slice(start, min(start + step, last))).to(torch.float32)

    def max_abs(self, name: str) -> torch.Tensor:
        """max |w| of a tensor, streamed (a per-tensor-scale format's scale)."""
        maxabs = torch.zeros(())
        for rows in self.row_chunks(name):
            maxabs = torch.maximum(maxabs, torch.maximum(rows.amax(), -rows.amin()))
        return maxabs

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._files.values()))

    def trained_formats(self) -> dict[str, WeightFormat]:
        """Checkpoint name -> format (a lattice) of every tensor QAT trained quantized; {} without qat.json.

        From qat.json's ``lattices``; a qat.json without them: its ``format`` for every tensor ``layout`` counts
        as quantized, or, for a mixture, its policy over this checkpoint's architecture
        (``mixtures.mixture_lattices``). Names are matched through their GGUF names, whatever the prefix."""
        qat = self.qat
        if qat is None:
            return {}
        fmt = get_format(qat.format)
        if not qat.lattices and not fmt.is_mixture:
            return {n: fmt for n in self.names() if role_is_quantized(tensor_role(n), qat.quantize_embeddings)}
        chosen = qat.lattices or mixture_lattices(self.architecture, fmt.name)
        by_gguf = {text_gguf_name(n): lattice for n, lattice in chosen.items()}
        out = {n: get_format(by_gguf[g]) for n in self.names() if (g := text_gguf_name(n)) in by_gguf}
        if len(out) != len(by_gguf):
            raise CorruptFileError(f"{self.path / QAT_JSON}: its lattices name {len(by_gguf) - len(out)} tensors "
                                   "this checkpoint does not hold; restore it or train again")
        return out

    def require_tokenizer_model(self) -> Path:
        """The file the exporters build the vocabulary from: ``tokenizer.model``, else ``tokenizer.json`` (the
        SentencePiece view is derived from it: ``gemma3_qat.vocab``); a one-line error when there is neither."""
        for name in ("tokenizer.model", "tokenizer.json"):
            if (self.path / name).exists():
                return self.path / name
        raise MissingFileError(
            f"{self.path} has neither tokenizer.model nor tokenizer.json: copy the base checkpoint's tokenizer "
            "files next to config.json"
        )


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def check_output(final: str | Path, *, force: bool = False, directory: bool = False,
                 make_parents: bool = True) -> Path:
    """Refuse an output before anything is written, with a one-line error naming the fix.

    Refused: an existing ``final`` without ``force``; with it, one of the other kind (a directory where a file
    goes, or a file where a directory goes: replacing it would lose it or fail half-way); a parent that is a
    file; and, with ``make_parents=False`` (the exporters: most tools refuse a mistyped parent rather than
    create it), a missing parent. An exporter checks every file it will write (the output, its model card,
    mmproj) first, so that a refusal leaves nothing written.
    """
    final = Path(final)
    if final.exists() or final.is_symlink():
        if not force:
            raise OutputExistsError(f"{final} already exists; pass --force to replace it")
        if final.is_dir() != directory:
            have, want = ("a directory", "file") if final.is_dir() else ("a file", "directory")
            raise OutputExistsError(f"{final} is {have}, which --force does not replace with a {want}; "
                                    f"choose another output path")
    parent = final.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{parent} is a file, not a directory: choose another output path")
    if not parent.exists() and not make_parents:
        raise MissingFileError(f"{parent} does not exist; create it first (mkdir -p {parent}) or choose another "
                               "output path")
    return final


def _umask() -> int:
    """The process umask (only readable by setting it: set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_umask_says(root: Path) -> None:
    """Give ``root`` (and, for a directory, everything under it) the modes a plain ``open``/``mkdir`` (or ``cp``)
    would: ``mkstemp``/``mkdtemp`` make 0600/0700, and safetensors' ``save_file`` makes 0600, which would leave
    exports unreadable to every other user and service."""
    mask = _umask()
    for path in [root, *(root.rglob("*") if root.is_dir() else ())]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_directory(final: str | Path, *, force: bool = False, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success it replaces ``final`` in one rename.

    On error the temporary directory is removed and ``final`` is untouched. Refuses an existing ``final`` unless
    ``force``, and what ``check_output`` refuses; the old directory is only removed after the new one is complete.
    What it holds gets the modes the umask gives a plain ``mkdir`` and ``open`` (not 0700 / 0600).
    """
    final = check_output(final, force=force, directory=True, make_parents=make_parents)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        _as_umask_says(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


@contextmanager
def atomic_file(final: str | Path, *, force: bool = False, make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success it replaces ``final`` atomically (``os.replace``).

    Refuses what ``check_output`` refuses (an existing ``final`` without ``force``, a directory even with it).
    The file gets the mode the umask gives a plain ``open`` (not mkstemp's 0600).
    """
    final = check_output(final, force=force, make_parents=make_parents)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _as_umask_says(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


# ------------------------------------------------------------------------------------------------- the writer


def write_qat_checkpoint(model, directory: str | Path, metadata: QATMetadata, tokenizer_dir: str | Path, *,
                         prepared_format: str | None = None, accelerator=None) -> None:
    """THE writer of a QAT checkpoint (every trainer checkpoint and the final run directory use it): the latent
    weights in their master dtype, ``config.json``, the tokenizer files and ``qat.json`` into ``directory``.

    With ``accelerator`` it is collective: every process calls it, ``get_state_dict`` gathers the full state dict
    (FSDP shards, DDP wrapper) and the main process writes. Without one (a single process holding ``model``),
    it writes directly. Nothing here is atomic: callers write into a temporary directory and rename it, then add
    the ``manifest.json`` (``write_manifest``) once every file of the checkpoint is complete.
    ``prepared_format``: the format ``model`` was prepared with (``qat.prepare``'s report), checked against
    ``metadata``.
    """
    state_dict, main = None, True
    if accelerator is not None:
        state_dict = accelerator.get_state_dict(model)
        model = accelerator.unwrap_model(model)
        main = accelerator.is_main_process
    if prepared_format is not None and prepared_format != metadata.format:
        raise InputError(f"model is prepared for {prepared_format} but the metadata says {metadata.format}")
    recorded = getattr(model, LATTICES_ATTR, None)
    if recorded and not metadata.lattices:  # the lattice of every tensor the model fake-quantizes
        metadata = replace(metadata, lattices=dict(recorded))
    if main:
        directory = Path(directory)
        # save_pretrained writes the Parameters as they are: the fake-quant modules keep the plain state-dict keys
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        copy_tokenizer_files(tokenizer_dir, directory)
        (directory / QAT_JSON).write_text(metadata.to_json())
        _as_umask_says(directory)  # safetensors writes 0600


class ShardWriter:
    """Tensors into safetensors shards of at most ``max_bytes`` (one ``model.safetensors`` when they fit, else
    ``model-NNNNN-of-NNNNN.safetensors`` + the index), in a directory that the caller renames into place."""

    def __init__(self, directory: Path, max_bytes: int, metadata: dict[str, str]):
        self.dir, self.max_bytes, self.metadata = directory, max_bytes, metadata
        self.shards: list[dict[str, torch.Tensor]] = [{}]
        self.current_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current_bytes and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        self.shards[-1][name] = tensor.contiguous()
        self.current_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self.written):05d}.safetensors"
        save_file(self.shards[-1], self.dir / name, metadata=self.metadata)
        self.written.append((name, list(self.shards[-1])))
        self.shards[-1] = {}
        self.current_bytes = 0

    def close(self) -> None:
        self._flush()
        n = len(self.written)
        if n == 1:
            (self.dir / self.written[0][0]).rename(self.dir / "model.safetensors")
            return
        weight_map = {}
        for i, (old, names) in enumerate(self.written):
            new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / old).rename(self.dir / new)
            weight_map.update({k: new for k in names})
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------- run directories

RUNS = Path("runs")
TRAIN_CONFIG = "train-config.yaml"  # written by train at setup: a directory holding it holds a (maybe unfinished) run


def default_output(model: str | None, fmt: str, root: Path = RUNS) -> Path:
    """``runs/<model>-<format>-<time>``: where ``train`` writes when no ``--output`` is given."""
    name = Path(model).name if model else "default"
    return root / f"{name}-{fmt}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_run(root: Path = RUNS, *, finished: bool = True) -> Path | None:
    """The most recent run under ``root``: finished ones (``qat.json`` written last) for export, or any run that
    started (``train-config.yaml``) for ``--resume``; None when there is none."""
    marker = QAT_JSON if finished else TRAIN_CONFIG
    runs = [p.parent for p in Path(root).glob(f"*/{marker}")]
    return max(runs, key=lambda p: (p / marker).stat().st_mtime) if runs else None
