"""Export a QAT checkpoint as safetensors for transformers, vLLM, llama.cpp re-quantization and gemma.cpp.

Layouts:
* ``unquantized``        a plain HF checkpoint whose quantized weights hold their dequantized (on-grid) values.
                         F32 (default): exact. F16: half the size; not every ``k * D`` fits (up to 14 significant
                         bits), yet llama.cpp's Q4_0 re-quantizes them to the same bytes; cannot hold SFP8's smallest
                         values. BF16: only where exact, or when asked (re-quantization is then not lossless).
                         ``config.json`` says bfloat16 whatever the storage dtype (Gemma 3 overflows in fp16).
                         Multimodal checkpoints use the legacy key layout llama.cpp's converter reads. This is the
                         layout of Google's ``-qat-q4_0-unquantized`` releases. A llama.cpp lattice or a mixture
                         (q4_k_m): each tensor holds its own lattice's values (F32: exact); llama.cpp's convert +
                         ``llama-quantize Q4_K_M`` of them gives the same types and values (Q4_K, Q5_0, Q8_0 the same
                         bytes; Q6_K may store some sub-block scales differently for the same values:
                         ``tests/test_kquant_export.py`` measures it). The run directory's own latent weights
                         re-quantize to the trained bytes of every type.
* ``compressed-tensors`` vLLM's ``pack-quantized`` int4 (W4A16, symmetric; group 32 for int4-block, channel for
                         int4-channel): ``weight_packed`` (int32, eight 4-bit values ``k + 8``), ``weight_scale`` (the
                         trained fp16 scale, stored as fp32 so decompression is exact), ``weight_shape``.
* ``sfp8``               gemma.cpp SFP codes (uint8 per weight) + the per-tensor scale, the other tensors bf16
                         (``--dtype``); ``load_sfp8`` restores the exact values, ``load_sfp8_model`` a transformers
                         model of them. transformers' own ``from_pretrained`` cannot read SFP codes (it would
                         initialise those weights afresh, with only a warning): use ``load_sfp8_model``.

The layouts a format allows, its compressed-tensors scheme and its codes layout are the format object's facts
(``gemma3_qat.formats``); which tensors are quantized is ``layout``'s rule. ``plan_safetensors_export``
decides every output tensor from the headers alone (``--dry-run``); the writer checks each tensor it writes
against the plan. Written shard by shard (``max_shard_bytes``) into a temporary directory that is renamed when
complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gemma3_qat import __version__
from gemma3_qat.checkpoint import (
    SAFETENSORS_DTYPES,
    ShardWriter,
    QAT_JSON,
    Checkpoint,
    atomic_directory,
    check_output,
    copy_tokenizer_files,
)
from gemma3_qat.report import PlanRow
from gemma3_qat.layout import legacy_name, tensor_role
from gemma3_qat.formats import FORMATS, SFP8, SFP8_DECODE_TABLE, FormatError, WeightFormat, get_format
from gemma3_qat.errors import CorruptFileError, InputError, MissingFileError

UNQUANTIZED, COMPRESSED_TENSORS = "unquantized", "compressed-tensors"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SFP8_METADATA = SFP8.safetensors_metadata
_HOLDS = {COMPRESSED_TENSORS: "compressed-tensors holds int4 here"}  # what a layout holds, for its refusal


def layouts() -> tuple[str, ...]:
    """Every layout: the two for any format, and each format's own codes layout (named after it: sfp8)."""
    return (UNQUANTIZED, COMPRESSED_TENSORS) + tuple(f.name for f in FORMATS.values() if f.safetensors_codes)


LAYOUTS = layouts()


def format_layouts(fmt: WeightFormat) -> tuple[str, ...]:
    """The layouts that can hold ``fmt``: unquantized always, compressed-tensors where the format has a scheme,
    its own codes layout where it has one."""
    return ((fmt.name,) if fmt.safetensors_codes else ()) + (UNQUANTIZED,) + (
        (COMPRESSED_TENSORS,) if fmt.compressed_tensors_scheme() else ())


class SafetensorsExportError(InputError):
    pass


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the output: its key, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class TensorPlan:
    """One checkpoint tensor and what it becomes: ``kind`` = copy (unquantized tensor), values (the format's
    dequantized values), packed (compressed-tensors) or codes (the format's own codes + scale)."""

    hf_name: str
    kind: str
    stored: tuple[StoredTensor, ...]


@dataclass
class SafetensorsPlan:
    """What ``export_safetensors`` writes (or, with ``dry_run``, would write)."""

    path: Path
    layout: str
    dtype: str
    format: str
    tensors: list[TensorPlan] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for t in self.tensors for s in t.stored)

    @property
    def notes(self) -> list[str]:
        return [f"layout {self.layout}, {self.format}, float tensors {self.dtype}"]

    def rows(self) -> list[PlanRow]:
        return [PlanRow(s.name, str(s.dtype).removeprefix("torch."), s.shape, s.nbytes, t.kind)
                for t in self.tensors for s in t.stored]


def _plan_tensor(ckpt: Checkpoint, name: str, fmt: WeightFormat | None, layout: str,
                 store: torch.dtype) -> TensorPlan:
    """``fmt``: the tensor's trained format (its lattice), None for a tensor not trained quantized."""
    out_name = legacy_name(name) if ckpt.multimodal else name
    shape = ckpt.shape(name)
    role = tensor_role(name)
    if fmt is None:
        dtype = SAFETENSORS_DTYPES[ckpt.dtype(name)]
        # unquantized float tensors at --dtype (bf16 for the packed and codes layouts: what the memory model counts
        # and gemma.cpp keeps), not the latent fp32 master copy; integer tensors as they are
        return TensorPlan(name, "copy", (StoredTensor(out_name, store if dtype.is_floating_point else dtype, shape),))
    base = out_name.removesuffix(".weight")
    if layout == UNQUANTIZED or (layout == COMPRESSED_TENSORS and role == "embedding"):
        return TensorPlan(name, "values", (StoredTensor(out_name, store, shape),))  # vLLM packs Linear weights only
    if layout == COMPRESSED_TENSORS:
        bits = fmt.compressed_tensors_scheme()["num_bits"]
        packed = (shape[0], math.ceil(math.prod(shape[1:]) * bits / 32))
        scale = fmt.scale_shape(shape)  # the trained fp16 scales, stored as fp32: decompression is exact
        return TensorPlan(name, "packed", (StoredTensor(base + ".weight_packed", torch.int32, packed),
                                           StoredTensor(base + ".weight_scale", torch.float32, scale),
                                           StoredTensor(base + ".weight_shape", torch.int64, (len(shape),))))
    scale_shape = fmt.scale_shape(shape) or (1,)  # a per-tensor scale is stored as [1]
    return TensorPlan(name, "codes", (StoredTensor(f"{base}.{fmt.name}_codes", torch.uint8, shape),
                                      StoredTensor(f"{base}.{fmt.name}_scale", fmt.scale_dtype, scale_shape)))


def plan_safetensors_export(ckpt: Checkpoint, output: Path, *, layout: str = UNQUANTIZED,
                            dtype: str | None = None) -> SafetensorsPlan:
    """Validate the options and decide every output tensor; reads only headers."""
    if layout not in layouts():
        raise SafetensorsExportError(f"unknown --layout {layout!r}; choose one of: {', '.join(layouts())}")
    if ckpt.qat is None:
        raise SafetensorsExportError(f"{ckpt.path} has no qat.json: safetensors export takes a QAT checkpoint "
                                     "(the output of gemma3-qat train; --steps 0 for post-training quantization)")
    fmt = get_format(ckpt.qat.format)
    if layout not in format_layouts(fmt):
        holds = _HOLDS.get(layout, f"it holds {layout} codes")
        raise SafetensorsExportError(f"--layout {layout} cannot hold {fmt.name} ({holds}); export {fmt.name} with "
                                     f"--layout {' or '.join(format_layouts(fmt))}")
    dtype = dtype or ("f32" if layout == UNQUANTIZED else "bf16")
    if dtype not in DTYPES:
        raise SafetensorsExportError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    store = DTYPES[dtype]
    if layout == UNQUANTIZED:
        try:
            fmt.check_value_dtype(store)
        except FormatError as e:
            raise SafetensorsExportError(str(e)) from None
    plan = SafetensorsPlan(Path(output), layout, dtype, fmt.name)
    trained = ckpt.trained_formats()  # each tensor's lattice (a mixture's differ by tensor)
    for name in ckpt.names():
        if tensor_role(name) is None:
            continue  # lm_head: tied to the embedding
        plan.tensors.append(_plan_tensor(ckpt, name, trained.get(name), layout, store))
    return plan


def _compressed_tensors_config(fmt: WeightFormat, ignore: list[str]) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": fmt.compressed_tensors_scheme(),
                                          "input_activations": None, "output_activations": None,
                                          "format": "pack-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None}


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Q4_0 codes ``q = k + 8`` in [0, 15] ``[out, in]`` -> int32 ``[out, ceil(in / 8)]``, element ``i`` at bits
    ``4 * (i % 8)`` of word ``i // 8`` (compressed-tensors' pack-quantized layout for 4 bits)."""
    out, n = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, (-n) % 8)).view(out, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (padded << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _encode(t: TensorPlan, latent: torch.Tensor, fmt: WeightFormat) -> list[torch.Tensor]:
    """The output tensors of one checkpoint tensor of kind copy, packed or codes, in the order of ``t.stored``."""
    if t.kind == "copy":
        return [latent.to(t.stored[0].dtype)]
    qw = fmt.quantize(latent)
    if t.kind == "packed":
        return [pack_int4(qw.codes), qw.scales.to(torch.float32), torch.tensor(list(latent.shape), dtype=torch.int64)]
    return [qw.codes, qw.scales.to(fmt.scale_dtype).reshape(t.stored[1].shape)]


def export_safetensors(checkpoint: str | Path, output: str | Path | None = None, *,
                       layout: str | None = UNQUANTIZED, dtype: str | None = None, force: bool = False,
                       dry_run: bool = False, max_shard_bytes: int = 5 * 10**9,
                       log: Callable[[str], None] | None = print) -> SafetensorsPlan:
    """Write ``checkpoint`` (a QAT checkpoint) to the directory ``output`` in ``layout``; return the plan.

    See the module docstring for the layouts (None: unquantized). ``dry_run``: validate and plan, write nothing.
    ``output`` (default: ``<checkpoint>-<layout>`` beside the checkpoint) obeys the exporters' rule (refused if it
    exists without ``force`` or is a file, or if its parent does not exist).
    """
    layout = layout or UNQUANTIZED
    if output is None:
        output = Path(checkpoint).parent / f"{Path(checkpoint).name}-{layout}"
    ckpt = Checkpoint(checkpoint, verify=not dry_run)  # a dry run checks sizes and headers, not checksums
    plan = plan_safetensors_export(ckpt, Path(output), layout=layout, dtype=dtype)
    ckpt.require_tokenizer_model()
    if dry_run:
        return plan
    check_output(plan.path, force=force, directory=True, make_parents=False)
    fmt, store = get_format(plan.format), DTYPES[plan.dtype]
    metadata = {"format": "pt", "gemma3_qat.version": __version__, "gemma3_qat.format": fmt.name,
                "gemma3_qat.layout": layout}
    if layout == fmt.name:
        metadata.update(fmt.safetensors_metadata)
    ignore = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*embed_tokens.*"]
    inexact = []
    trained = ckpt.trained_formats()
    with atomic_directory(plan.path, force=force, make_parents=False) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, metadata)
        for t in plan.tensors:
            latent = ckpt.read(t.hf_name)
            if t.kind == "values":
                values = trained[t.hf_name].fake_quantize_values(latent)
                tensors = [values.to(store)]
                if store != torch.float32 and not torch.equal(tensors[0].float(), values):
                    inexact.append(t.hf_name)
            else:
                tensors = _encode(t, latent, trained.get(t.hf_name, fmt))
            for want, tensor in zip(t.stored, tensors, strict=True):
                if tensor.dtype != want.dtype or tuple(tensor.shape) != want.shape:
                    raise SafetensorsExportError(f"internal error: {want.name} is {tensor.dtype} "
                                                 f"{tuple(tensor.shape)}, planned {want.dtype} {want.shape}")
                writer.add(want.name, tensor)
        writer.close()

        config = dict(ckpt.config)
        config["torch_dtype"] = "bfloat16"  # never run Gemma 3 in fp16: its activations overflow
        config["dtype"] = "bfloat16"
        if ckpt.multimodal and "text_config" in config:
            config["text_config"] = {**config["text_config"], "dtype": "bfloat16"}
        if layout == COMPRESSED_TENSORS:
            config["quantization_config"] = _compressed_tensors_config(fmt, ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(ckpt.path, tmp)
        qat = json.loads((ckpt.path / QAT_JSON).read_text())
        (tmp / QAT_JSON).write_text(json.dumps({**qat, "export": {"layout": layout, "dtype": plan.dtype}}, indent=2)
                                    + "\n")
    if inexact and log:
        log(f"warning: {len(inexact)} quantized tensors are not exact in {plan.dtype} (e.g. {inexact[0]}); "
            "llama.cpp re-quantization of this file will not be lossless" if plan.dtype == "bf16" else
            f"note: {len(inexact)} tensors rounded to {plan.dtype}; llama.cpp's Q4_0 still re-quantizes them to the "
            "trained bytes (F32 keeps the exact values)" if fmt.name in ("int4-block", "int4-channel") else
            f"warning: {len(inexact)} quantized tensors are not exact in {plan.dtype} (e.g. {inexact[0]}); F32 keeps "
            "the exact values")
    return plan


def _sfp8_files(directory: Path) -> list[Path]:
    """The weight files of an sfp8 export, checked to be one: every shard present, each written by this layout."""
    from safetensors import safe_open

    if not directory.is_dir():
        raise MissingFileError(f"{directory} does not exist or is not a directory: pass an sfp8 export "
                               "(gemma3-qat export --to safetensors --layout sfp8)")
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (directory / n).exists()]
        if missing:
            raise MissingFileError(f"{directory}: shard {missing[0]} named by {index.name} is missing "
                                   f"({len(missing)} of {len(names)}); copy the whole export directory")
        files = [directory / n for n in names]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{directory} holds no .safetensors file: not an sfp8 export")
    for f in files:
        with safe_open(str(f), "pt") as handle:
            layout = (handle.metadata() or {}).get("gemma3_qat.layout")
        if layout != SFP8.name:
            raise SafetensorsExportError(f"{f} is not an sfp8 export (layout {layout!r}); load it with transformers' "
                                         "from_pretrained, or export with --layout sfp8")
    return files


def load_sfp8(directory: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an ``sfp8`` export with every quantized weight restored to its exact fp32 value.

    Refuses a directory that is not a complete sfp8 export (a missing shard, another layout, a code tensor without
    its scale) rather than returning a partial state dict.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    state: dict[str, torch.Tensor] = {}
    for f in _sfp8_files(directory):
        state.update(load_file(str(f)))
    for key in [k for k in state if k.endswith(".sfp8_codes")]:
        base = key.removesuffix(".sfp8_codes")
        if base + ".sfp8_scale" not in state:
            raise CorruptFileError(f"{directory}: {key} has no {base}.sfp8_scale; re-export the checkpoint")
        codes, scale = state.pop(key), state.pop(base + ".sfp8_scale")
        state[base + ".weight"] = SFP8_DECODE_TABLE[codes.long()] * scale.reshape(())
    return state


def load_sfp8_model(directory: str | Path, *, dtype: torch.dtype = torch.float32):
    """A transformers Gemma 3 model of an ``sfp8`` export, every weight from the file (the SFP ones exact in fp32).

    Refuses, naming the tensor, when the files do not provide every weight of the model or provide one it does not
    have: nothing is initialised afresh (transformers' ``from_pretrained`` on the directory would, for every SFP
    weight, with only a warning).
    """
    from transformers import AutoConfig, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    from gemma3_qat.models import is_multimodal_gemma3

    directory = Path(directory)
    state = load_sfp8(directory)
    config = AutoConfig.from_pretrained(str(directory))
    cls = Gemma3ForConditionalGeneration if is_multimodal_gemma3(config, str(directory)) else Gemma3ForCausalLM
    model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    tied = {"lm_head.weight"}
    missing = sorted(set(info["missing_keys"]) - tied)
    problems = [("missing from the files", missing), ("not in the model", sorted(info["unexpected_keys"])),
                ("of the wrong shape", [str(k) for k in info["mismatched_keys"]])]
    for what, keys in problems:
        if keys:
            raise CorruptFileError(f"{directory}: {len(keys)} weights {what} (e.g. {keys[0]}); refusing to "
                                   "initialise them: re-export with gemma3-qat export --to safetensors --layout sfp8")
    return model.eval()
