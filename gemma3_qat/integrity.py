"""What a checkpoint's bytes must be before anything reads them: manifests and safetensors headers.

A leaf module (it imports only the errors), so every reader can check first: ``Checkpoint`` (the exporters),
``sources.load_gemma3`` (training and eval load models with transformers) and the trainer's ``--resume``.

* A manifest (``manifest.json``, written last into every checkpoint ``train`` writes) records each file's size
  and SHA-256: sizes catch a torn copy for a stat each, checksums a flipped bit for a read of the file.
* Every safetensors header is checked against the spec before a tensor is read (``safetensors_header``): the
  chunked reader trusts its offsets, and a short read of a torn file would otherwise come back as weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from gemma3_qat.errors import CorruptFileError, MissingFileError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_json(path: str | Path):
    """A JSON file's contents; a file that is not valid UTF-8 JSON is a one-line ``CorruptFileError``."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({str(e).splitlines()[0]}); restore the file (copy it "
                               "again from where it came from)") from None


MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB blocks (about 1 GB/s: seconds per GB, small next to writing it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path) -> None:
    """Record the size and SHA-256 of every regular file under ``directory`` in ``directory/manifest.json``.

    Paths are relative, with forward slashes; the manifest itself is left out. Call it last, when every file is
    complete: a checkpoint then carries what it needs to verify itself (``verify_manifest``), so a torn or
    bit-flipped file is refused before it is read into a model or an export. Written atomically (temporary file +
    ``os.replace``), so a crash leaves either no manifest or a whole one.
    """
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST or path.is_symlink() or not path.is_file():
            continue
        files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    text = json.dumps({"manifest_version": _MANIFEST_VERSION, "files": files}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".partial", dir=directory)
    mask = os.umask(0o022)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes 0600: readable as the umask says, like the files it lists
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(directory: str | Path) -> dict[str, dict] | None:
    """``{relative path: {"bytes": n, "sha256": hex}}`` from ``directory/manifest.json``; None without one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    fix = "the checkpoint directory was damaged: use an earlier checkpoint or train again"
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                for v in files.values()):
            raise ValueError("entries are not {bytes, sha256}")
        if any(Path(rel).is_absolute() or ".." in Path(rel).parts for rel in files):
            raise ValueError("a path leaves the directory")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not a valid manifest ({e}); {fix}") from e
    return files


def verify_manifest(directory: str | Path, *, files: Iterable[str] | None = None, all_sizes: bool = True,
                    checksums: bool = True) -> None:
    """Check ``directory`` against its ``manifest.json``: every listed file's size, and the SHA-256 of ``files``.

    No manifest (a user's HF checkpoint, a run from before manifests): nothing to check, return. Sizes are always
    checked for every listed file (a stat each: catches a torn copy for free); checksums only for ``files`` (names
    relative to ``directory``; those the manifest does not list are left to their readers), or for all listed
    files when ``files`` is None. ``all_sizes=False``: sizes of ``files`` only (an export reads the weights; a
    tokenizer file edited by hand is the user's business); ``checksums=False``: sizes only (a dry run).
    Raises :class:`CorruptFileError` on the first missing or mismatching file.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return
    fix = ("the file was truncated or changed after the checkpoint was written: restore it, use an earlier "
           "checkpoint, or train again")
    wanted = manifest if files is None else [Path(f).as_posix() for f in files]
    for rel, entry in manifest.items():
        if not all_sizes and rel not in wanted:  # e.g. a chat template edited by hand: not the weights' business
            continue
        path = directory / rel
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing but the manifest lists it ({entry['bytes']:,} bytes); {fix}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CorruptFileError(f"{path}: {size:,} bytes, manifest says {entry['bytes']:,}; {fix}")
    for rel in wanted if checksums else ():
        if rel in manifest and _sha256(directory / rel) != manifest[rel]["sha256"]:
            raise CorruptFileError(f"{directory / rel}: SHA-256 differs from the manifest's (same size, "
                                   f"different bytes); {fix}")


# safetensors' dtypes (the spec's list) with their item sizes
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                         "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own limit: a larger length is a corrupt prefix
_CORRUPT_FIX = "the file is truncated or corrupt: copy or export it again, or use another checkpoint"


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts (8-byte length, header, data).

    The header is checked against the safetensors spec before any tensor is read, because the chunked reader
    trusts it: a short read of a torn file would otherwise come back as garbage weights (an export of a file cut
    by 1 KB wrote a GGUF). Checked: the little-endian length fits in the file, the header is a UTF-8 JSON object,
    every tensor has a known dtype, a shape of non-negative ints and ``data_offsets`` [begin, end] holding exactly
    shape x dtype bytes, no two tensors overlap, and the data area is exactly as long as the last tensor's end.
    """
    path = Path(path)
    size = path.stat().st_size

    def corrupt(what: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: {what}; {_CORRUPT_FIX}")

    with open(path, "rb") as f:
        if size < 8:
            raise corrupt(f"{size} bytes, too short for a safetensors file (8-byte header length first)")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise corrupt(f"header length says {n:,} bytes, the file has {size - 8:,} after it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"header is not valid UTF-8 JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise corrupt(f"header is a JSON {type(header).__name__}, not an object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise corrupt("__metadata__ is not a map of strings to strings")
            continue
        spans.append((*_tensor_span(name, entry, corrupt), name))
    data_size = size - 8 - n
    end = max((e for _, e, _ in spans), default=0)
    if end > data_size:
        raise corrupt(f"truncated: header says {end:,} bytes of tensor data, the file has {data_size:,}")
    if end < data_size:
        raise corrupt(f"header says {end:,} bytes of tensor data, the file has {data_size:,} "
                      f"({data_size - end:,} bytes no tensor accounts for)")
    spans.sort()
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise corrupt(f"tensors {name0!r} and {name1!r} overlap (data bytes {begin1:,} to {end0:,})")
    return header, 8 + n


def _tensor_span(name: str, entry, corrupt) -> tuple[int, int]:
    """A header entry's [begin, end) after checking it is a tensor entry whose byte count matches its shape."""
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise corrupt(f"tensor {name!r}: entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _SAFETENSORS_ITEMSIZE:
        raise corrupt(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        raise corrupt(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise corrupt(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with begin <= end")
    begin, end = offsets
    need = math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype]
    if end - begin != need:
        raise corrupt(f"tensor {name!r}: data_offsets [{begin:,}, {end:,}] hold {end - begin:,} bytes, "
                      f"shape {shape} x {dtype} needs {need:,}")
    return begin, end


def weight_shards(directory: str | Path) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory (relative names) and its index's ``weight_map`` (tensor
    name -> file), or None for a single ``model.safetensors``. Every listed file must exist."""
    directory = Path(directory)
    index = directory / INDEX
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptFileError(f"{index}: no weight_map of tensor names to shard files; {_CORRUPT_FIX}")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (directory / shard).is_file():
                raise MissingFileError(f"{directory / shard} is missing: {INDEX} lists it; copy the whole "
                                       "checkpoint")
        return shards, weight_map
    if not (directory / SINGLE).exists():
        raise MissingFileError(f"{directory} has no {SINGLE} (or index): no weights to read")
    return [SINGLE], None


def verify_weights(directory: str | Path, *, checksums: bool = True) -> dict[str, tuple[dict, int]]:
    """Check a checkpoint directory's weights before they are read: its manifest when it has one (the weight
    files' sizes; their SHA-256 with ``checksums``), the index, and every safetensors header; each tensor the
    index names must be in its shard. Returns ``{shard: (header, data start)}``."""
    directory = Path(directory)
    shards, weight_map = weight_shards(directory)
    verify_manifest(directory, files=shards, all_sizes=False, checksums=checksums)
    headers = {shard: safetensors_header(directory / shard) for shard in shards}
    for name, shard in (weight_map or {}).items():
        if name not in headers[shard][0]:
            raise CorruptFileError(f"{directory / shard}: has no tensor {name!r}, which {INDEX} maps to it; "
                                   f"{_CORRUPT_FIX}")
    return headers
