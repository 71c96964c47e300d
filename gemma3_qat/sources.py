"""Where a model comes from: the embedded default, a local HF checkpoint directory, a hub id, or a ``.gguf`` file.

``resolve_model`` turns what a user passes as ``--model`` / ``--teacher`` into something transformers loads: the
embedded model's directory for None, a directory as it is, a hub id as it is, and a ``.gguf`` file (a download,
Ollama's blob store) into a Hugging Face checkpoint directory made once and cached (``gguf_checkpoint``): its
weights dequantized by transformers' GGUF support and stored as F32 (the dequantized values of every GGUF type are
exact in fp32, not in bf16 or fp16), its tokenizer built by transformers from the file's vocabulary, and a
``gguf-source.json`` naming the file, its SHA-256 and its tensor types. A GGUF whose matmuls are stored below 8
bits is a quantized model: as a teacher it carries that quantization's noise, and one warning line says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from gemma3_qat.checkpoint import TOKENIZER_FILES, atomic_directory
from gemma3_qat.errors import InputError, MissingFileError
from gemma3_qat.models import (Architecture, NotGemma3Error, architecture_from_config, is_multimodal_gemma3,
                               read_architecture)

GGUF_SOURCE = "gguf-source.json"  # in a checkpoint made from a GGUF file: where it came from
CACHE_ENV = "GEMMA3_QAT_CACHE"  # default: ~/.cache/gemma3-qat


def cache_root() -> Path:
    """Where converted sources are kept: ``$GEMMA3_QAT_CACHE``, else ``~/.cache/gemma3-qat``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma3-qat").expanduser()


def resolve_model(name_or_path: str | None, *, log: Callable[[str], None] | None = print) -> str:
    """A local checkpoint directory for a directory, None (the embedded default model) or a ``.gguf`` file (its
    cached conversion, ``gguf_checkpoint``); a hub id as it is."""
    if name_or_path is None:
        from gemma3_qat.assets import default_model_path

        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(gguf_checkpoint(path, log=log))
    if path.exists():
        if path.is_file():
            raise InputError(f"{path} is a file but not a .gguf: pass a Hugging Face checkpoint directory or a "
                             "GGUF file")
        if not (path / "config.json").exists():
            raise NotGemma3Error(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return str(path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return name_or_path  # a hub id
    raise MissingFileError(f"model {name_or_path} does not exist (neither a local directory, a .gguf file nor a "
                           "hub id)")


def source_architecture(name_or_path: str | None) -> Architecture:
    """The architecture of what ``--model`` names (``resolve_model``), from its config alone: a local directory's
    ``config.json``, a hub id's (downloaded as transformers would), a ``.gguf``'s cached conversion."""
    source = resolve_model(name_or_path)
    if Path(source).is_dir():
        return read_architecture(source)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise hub_error(source, e) from None
    return architecture_from_config(config, source, source)


def hub_error(source: str, exc: Exception) -> MissingFileError:
    first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return MissingFileError(f"cannot get {source!r} from the hub ({first}); are you offline? pass a local "
                            "checkpoint directory or a .gguf file with --model")


def load_gemma3(name_or_path: str | None, *, dtype=None, device=None, **kwargs):
    """Load a Gemma 3 checkpoint (text-only or multimodal; a directory, a hub id or a ``.gguf``) with
    transformers, with clear errors."""
    from transformers import AutoConfig, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    from gemma3_qat.integrity import verify_weights

    source = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise hub_error(source, e) from None
    cls = Gemma3ForConditionalGeneration if is_multimodal_gemma3(config, source) else Gemma3ForCausalLM
    if Path(source).is_dir():  # torn or corrupt local weights: one line naming the file, before transformers reads
        verify_weights(source)
    model = cls.from_pretrained(source, dtype=dtype, **kwargs)
    if device is not None:
        model.to(device)
    return model


def local_tokenizer_dir(source: str) -> str:
    """A local directory with the checkpoint's tokenizer files: ``source`` itself, or a download of just those
    files for a hub id (the weights are loaded by ``load_gemma3``)."""
    if Path(source).exists():
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=list(TOKENIZER_FILES))
    except Exception as e:  # offline, unknown id, gated
        raise hub_error(source, e) from None


# ------------------------------------------------------------------------------------------------- GGUF files


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def gguf_summary(path: str | Path) -> dict:
    """What a GGUF file holds, read from its header (validated first): architecture, name, tensor types and the
    bits per weight of its matmuls. Refuses a GGUF that is not a Gemma 3 text model, in one line."""
    from gemma3_qat.gguf_file import bits_per_weight, open_gguf

    reader = open_gguf(path)
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != "gemma3":
        raise NotGemma3Error(f"{path} is a GGUF of architecture {arch!r}, not a Gemma 3 model (gemma3)")
    name = reader.fields.get("general.name")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    matmul_bits, file_bits = bits_per_weight(path)
    return {"architecture": arch, "name": name.contents() if name is not None else Path(path).stem,
            "tensor_types": types, "matmul_bits_per_weight": round(matmul_bits, 3),
            "file_bits_per_weight": round(file_bits, 3)}


def gguf_checkpoint(path: str | Path, *, root: Path | None = None,
                    log: Callable[[str], None] | None = print) -> Path:
    """The Hugging Face checkpoint directory of a Gemma 3 ``.gguf`` file, converted once and cached under
    ``root`` (default ``cache_root()/gguf``) by the file's SHA-256: F32 safetensors of the dequantized weights,
    ``config.json``, the tokenizer transformers builds from the file, and ``gguf-source.json``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"GGUF file {path} does not exist")
    summary = gguf_summary(path)
    if summary["matmul_bits_per_weight"] < 8 and log:
        types = ", ".join(f"{k} {v}" for k, v in sorted(summary["tensor_types"].items()))
        log(f"warning: {path.name} is a quantized model (matmuls at {summary['matmul_bits_per_weight']:.2f} "
            f"bits/weight; tensors {types}): as a teacher it carries that quantization's noise")
    sha = _sha256(path)
    out = (root or cache_root() / "gguf") / f"{summary['name']}-{sha[:16]}".replace("/", "_").replace(" ", "_")
    done = out / GGUF_SOURCE
    if done.exists():
        try:
            if json.loads(done.read_text()).get("sha256") == sha:
                return out
        except ValueError:
            pass  # a damaged record: convert again
    if log:
        log(f"converting {path.name} to a checkpoint (dequantized by transformers' GGUF support; once, cached in "
            f"{out})")
    _convert(path, out, {"source": str(path.resolve()), "sha256": sha, **summary})
    return out


def _convert(path: Path, out: Path, record: dict) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemma3_qat.integrity import write_manifest

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - whatever transformers' GGUF reader rejects, named in one line
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise InputError(f"{path}: transformers cannot read this GGUF ({first})") from None
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are dequantized: a plain checkpoint
    config["dtype"] = "float32"
    # the tied head is the embedding: store it once, as transformers' own save_pretrained does
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out, force=True) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_SOURCE).write_text(json.dumps(record, indent=2) + "\n")
        write_manifest(tmp)
