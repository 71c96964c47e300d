"""Export a QAT checkpoint as safetensors for transformers, vLLM, llama.cpp re-quantization and gemma.cpp.

Layouts:
* ``unquantized``        a plain HF checkpoint whose quantized weights hold their dequantized (on-grid) values.
                         F32 (default): exact. F16: half the size; not every ``k * D`` fits (up to 14 significant
                         bits), yet llama.cpp's Q4_0 re-quantizes them to the same bytes; cannot hold SFP8's smallest
                         values. BF16: only where exact, or when asked (re-quantization is then not lossless).
                         ``config.json`` says bfloat16 whatever the storage dtype (Gemma 3 overflows in fp16).
                         Multimodal checkpoints use the legacy key layout llama.cpp's converter reads. This is the
                         layout of Google's ``-qat-q4_0-unquantized`` releases.
* ``compressed-tensors`` vLLM's ``pack-quantized`` int4 (W4A16, symmetric; group 32 for int4-block, channel for
                         int4-channel): ``weight_packed`` (int32, eight 4-bit values ``k + 8``), ``weight_scale`` (the
                         trained fp16 scale, stored as fp32 so decompression is exact), ``weight_shape``.
* ``sfp8``               gemma.cpp SFP codes (uint8 per weight) + the per-tensor scale; ``load_sfp8`` restores the
                         exact values.

Written shard by shard (``max_shard_bytes``) into a temporary directory that is renamed when complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from gemma3_qat import __version__
from gemma3_qat.checkpoint import Checkpoint, QAT_JSON, atomic_directory, copy_tokenizer_files
from gemma3_qat.formats import SFP8_DECODE_TABLE, get_format
from gemma3_qat.errors import InputError

LAYOUTS = ("unquantized", "compressed-tensors", "sfp8")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SFP8_METADATA = {"format": "gemma3-qat-sfp8", "encoding": "gemma.cpp switched floating point (SFP): per weight one "
                 "byte, bit 7 sign; bit 6 = 1: (1 + m/8) * 2^(E-15), E = bits 6..3 + 8, m = bits 2..0; bit 6 = 0: "
                 "(1 + m/4) * 2^(E-23), E = bits 5..2, m = bits 1..0; magnitude 0 = zero; value = decoded * scale"}
_MATMUL = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


class SafetensorsExportError(InputError):
    pass


def legacy_name(name: str) -> str:
    """HF key in the legacy multimodal layout (``language_model.model.*``, ``vision_tower.vision_model.*``)."""
    name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
    name = re.sub(r"^(?:model\.)?vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", name)
    name = re.sub(r"^model\.vision_tower\.", "vision_tower.", name)
    return re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", name)


def _is_quantized(name: str, ckpt: Checkpoint) -> bool:
    if _MATMUL.search(name) and "vision" not in name:
        return True
    return bool(ckpt.qat.quantize_embeddings) and name.endswith("embed_tokens.weight")


class _ShardWriter:
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


def _compressed_tensors_config(fmt: str, ignore: list[str]) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False, "observer": "minmax",
               "strategy": "group" if fmt == "int4-block" else "channel",
               "group_size": 32 if fmt == "int4-block" else None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ignore, "kv_cache_scheme": None}


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Q4_0 codes ``q = k + 8`` in [0, 15] ``[out, in]`` -> int32 ``[out, ceil(in / 8)]``, element ``i`` at bits
    ``4 * (i % 8)`` of word ``i // 8`` (compressed-tensors' pack-quantized layout for 4 bits)."""
    out, n = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, (-n) % 8)).view(out, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    words = (padded << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def export_safetensors(checkpoint: str | Path, output: str | Path, *, layout: str = "unquantized",
                       dtype: str | None = None, force: bool = False, max_shard_bytes: int = 5 * 10**9,
                       log: Callable[[str], None] | None = print) -> Path:
    """Write ``checkpoint`` (a QAT checkpoint) to ``output`` in ``layout``. See the module docstring."""
    if layout not in LAYOUTS:
        raise SafetensorsExportError(f"unknown --layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    ckpt = Checkpoint(checkpoint)
    if ckpt.qat is None:
        raise SafetensorsExportError(f"{ckpt.path} has no qat.json: safetensors export takes a QAT checkpoint "
                                     "(the output of gemma3-qat train; --steps 0 for post-training quantization)")
    fmt = get_format(ckpt.qat.format)
    if layout == "compressed-tensors" and fmt.name == "sfp8":
        raise SafetensorsExportError("compressed-tensors holds int4 here; export sfp8 with --layout sfp8 or unquantized")
    if layout == "sfp8" and fmt.name != "sfp8":
        raise SafetensorsExportError(f"--layout sfp8 needs an sfp8 checkpoint, this one is {fmt.name}")
    dtype = dtype or ("f32" if layout == "unquantized" else "bf16")
    if dtype not in DTYPES:
        raise SafetensorsExportError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    store = DTYPES[dtype]
    if layout == "unquantized" and dtype == "f16" and fmt.name == "sfp8":
        raise SafetensorsExportError("f16 cannot hold SFP8's smallest values (below fp16's subnormal step); use f32")
    ckpt.require_tokenizer_model()

    metadata = {"format": "pt", "gemma3_qat.version": __version__, "gemma3_qat.format": fmt.name,
                "gemma3_qat.layout": layout}
    if layout == "sfp8":
        metadata.update(SFP8_METADATA)
    ignore = ["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*embed_tokens.*"]
    inexact = []
    with atomic_directory(output, force=force) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes, metadata)
        for name in ckpt.names():
            if name == "lm_head.weight":
                continue  # tied to the embedding
            out_name = legacy_name(name) if ckpt.multimodal else name
            latent = ckpt.read(name)
            if not _is_quantized(name, ckpt):
                writer.add(out_name, latent.to(store) if latent.is_floating_point() and layout != "sfp8" else latent)
                continue
            if layout == "unquantized" or (layout == "compressed-tensors" and "embed_tokens" in name):
                values = fmt.fake_quantize_values(latent)
                stored = values.to(store)
                if store != torch.float32 and not torch.equal(stored.float(), values):
                    inexact.append(name)
                writer.add(out_name, stored)
            elif layout == "compressed-tensors":
                qw = fmt.quantize(latent)
                base = out_name.removesuffix(".weight")
                writer.add(base + ".weight_packed", pack_int4(qw.codes))
                writer.add(base + ".weight_scale", qw.scales.to(torch.float32))
                writer.add(base + ".weight_shape", torch.tensor(list(latent.shape), dtype=torch.int64))
            else:  # sfp8
                qw = fmt.quantize(latent)
                writer.add(out_name.removesuffix(".weight") + ".sfp8_codes", qw.codes)
                writer.add(out_name.removesuffix(".weight") + ".sfp8_scale", qw.scales.reshape(1))
        writer.close()

        config = dict(ckpt.config)
        config["torch_dtype"] = "bfloat16"  # never run Gemma 3 in fp16: its activations overflow
        config["dtype"] = "bfloat16"
        if ckpt.multimodal and "text_config" in config:
            config["text_config"] = {**config["text_config"], "dtype": "bfloat16"}
        if layout == "compressed-tensors":
            config["quantization_config"] = _compressed_tensors_config(fmt.name, ignore)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(ckpt.path, tmp)
        qat = json.loads((ckpt.path / QAT_JSON).read_text())
        (tmp / QAT_JSON).write_text(json.dumps({**qat, "export": {"layout": layout, "dtype": dtype}}, indent=2) + "\n")
    if inexact and log:
        log(f"warning: {len(inexact)} quantized tensors are not exact in {dtype} (e.g. {inexact[0]}); "
            "llama.cpp re-quantization of this file will not be lossless" if dtype == "bf16" else
            f"note: {len(inexact)} tensors rounded to {dtype}; llama.cpp's Q4_0 still re-quantizes them to the "
            "trained bytes (F32 keeps the exact values)")
    return Path(output)


def load_sfp8(directory: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an ``sfp8`` export with every quantized weight restored to its exact fp32 value."""
    from safetensors.torch import load_file

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    for key in [k for k in state if k.endswith(".sfp8_codes")]:
        base = key.removesuffix(".sfp8_codes")
        codes, scale = state.pop(key), state.pop(base + ".sfp8_scale")
        state[base + ".weight"] = SFP8_DECODE_TABLE[codes.long()] * scale.reshape(())
    return state
