"""Opening a GGUF file for reading: validated first, so a bad file is one line naming it, never numpy internals.

``gguf.GGUFReader`` memory-maps the file and trusts every length and offset in it: a truncated file fails with
"cannot reshape array of size 240 into shape (256,)" or "When changing to a larger dtype ...", an empty one with
"cannot mmap an empty file", a flipped byte in a string length with an ``IndexError``. ``open_gguf`` walks the
header once with bounded reads (magic, version, every key/value and tensor record, each length checked against
the bytes left), checks every tensor's type, shape and byte range against the data area, and only then hands
the file to ``GGUFReader``. Anything it still rejects is reported as a corrupt file too.
"""

from __future__ import annotations

import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from gemma3_qat.errors import CorruptFileError, InputError, MissingFileError
from gemma3_qat.layout import MATMUL_ROLES, gguf_role

MAX_DIMS = 4  # GGML_MAX_DIMS in ggml.h (the gguf package does not export it): llama.cpp refuses more
_FIX = "the file is truncated or corrupt: export or download it again"

V = GGUFValueType
# struct codes of the fixed-size value types (GGUFReader.gguf_scalar_to_np's table); strings and arrays apart
_SCALARS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i", V.FLOAT32: "f",
            V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
_STRING, _ARRAY = V.STRING, V.ARRAY


class _Cursor:
    """Sequential reads from the header that never run past the end of the file (each a clear error if they would)."""

    def __init__(self, f, size: int, path: Path, order: str = "<"):
        self.f, self.size, self.path, self.order, self.pos = f, size, path, order, 0

    def corrupt(self, what: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path}: {what}; {_FIX}")

    def _check(self, n: int, what: str) -> None:
        if n > self.size - self.pos:  # a cut file, or a flipped byte in a length: the file cannot tell which
            raise self.corrupt(f"{what} at byte {self.pos:,} needs {n:,} bytes, the file has "
                               f"{self.size - self.pos:,} left")

    def take(self, n: int, what: str) -> bytes:
        self._check(n, what)
        data = self.f.read(n)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._check(n, what)
        self.f.seek(n, 1)
        self.pos += n

    def scalar(self, code: str, what: str):
        return struct.unpack(self.order + code, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.scalar("Q", f"{what} length"), what)

    def value(self, vtype: int, key: str, depth: int = 0) -> None:
        """Skip one value of type ``vtype``, checking every length in it."""
        if vtype in _SCALARS:
            self.skip(struct.calcsize(_SCALARS[vtype]), f"value of {key}")
        elif vtype == _STRING:  # decoded: GGUF strings are UTF-8, and GGUFReader's contents() would fail later
            try:
                self.string(f"string of {key}").decode("utf-8")
            except UnicodeDecodeError:
                raise self.corrupt(f"a string of key {key!r} is not UTF-8") from None
        elif vtype == _ARRAY and depth == 0:
            item, count = self.scalar("I", f"array type of {key}"), self.scalar("Q", f"array length of {key}")
            if item in _SCALARS:
                self.skip(count * struct.calcsize(_SCALARS[item]), f"array of {count:,} values of {key}")
            elif item in (_STRING, _ARRAY):
                if count * 8 > self.size - self.pos:  # every element has at least an 8-byte length
                    raise self.corrupt(f"array of {count:,} values of {key} at byte {self.pos:,} cannot fit in "
                                       f"the {self.size - self.pos:,} bytes left")
                for _ in range(count):
                    self.value(item, key, depth + 1)
            else:
                raise self.corrupt(f"key {key!r}: unknown array element type {item}")
        else:
            raise self.corrupt(f"key {key!r}: unknown value type {vtype}")


def validate_gguf(path: str | Path) -> None:
    """Check a GGUF file's header and tensor table against its size; ``CorruptFileError`` naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a GGUF file: pass the .gguf file itself")
    if not path.exists():
        raise MissingFileError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file: pass a .gguf file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        c = _Cursor(f, size, path)
        if size == 0:
            raise c.corrupt("empty file (0 bytes)")
        magic = c.take(4, "magic")
        if struct.unpack("<I", magic)[0] != GGUF_MAGIC:
            raise CorruptFileError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF'); pass a .gguf "
                                   "file written by gemma3-qat export or llama.cpp")
        version = c.scalar("I", "version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order (as GGUFReader detects it)
            c.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in READER_SUPPORTED_VERSIONS:
            raise c.corrupt(f"GGUF version {version}, the gguf package reads {READER_SUPPORTED_VERSIONS}")
        n_tensors, n_kv = c.scalar("Q", "tensor count"), c.scalar("Q", "key/value count")
        alignment = GGUF_DEFAULT_ALIGNMENT
        for i in range(n_kv):
            try:
                key = c.string(f"key {i + 1} of {n_kv:,}").decode("utf-8")
            except UnicodeDecodeError:
                raise c.corrupt(f"key {i + 1} of {n_kv:,} is not UTF-8") from None
            vtype = c.scalar("I", f"type of {key}")
            if key == "general.alignment" and vtype == V.UINT32:
                alignment = c.scalar("I", key)
                if alignment == 0 or alignment & (alignment - 1):
                    raise c.corrupt(f"general.alignment {alignment} is not a power of two")
            else:
                c.value(vtype, key)
        tensors = [_tensor_record(c, i, n_tensors) for i in range(n_tensors)]
        data_start = -(-c.pos // alignment) * alignment
    _check_data(path, tensors, data_start, size, alignment)


def _tensor_record(c: _Cursor, i: int, n: int) -> tuple[str, int, int]:
    """(name, offset, bytes) of tensor record ``i``, its type and shape checked."""
    try:
        name = c.string(f"name of tensor {i + 1} of {n:,}").decode("utf-8")
    except UnicodeDecodeError:
        raise c.corrupt(f"name of tensor {i + 1} of {n:,} is not UTF-8") from None
    n_dims = c.scalar("I", f"dimension count of {name}")
    if n_dims > MAX_DIMS:
        raise c.corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
    dims = [c.scalar("Q", f"dimensions of {name}") for _ in range(n_dims)]
    raw_type, offset = c.scalar("I", f"type of {name}"), c.scalar("Q", f"offset of {name}")
    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        raise c.corrupt(f"tensor {name!r} has unknown type {raw_type}") from None
    if dims and dims[0] % block:
        raise c.corrupt(f"tensor {name!r}: row of {dims[0]} values is not a whole number of "
                        f"{GGMLQuantizationType(raw_type).name} blocks of {block}")
    n_values = 1
    for d in dims:
        n_values *= d
    return name, offset, n_values // block * block_bytes


def _check_data(path: Path, tensors: list[tuple[str, int, int]], data_start: int, size: int,
                alignment: int) -> None:
    data_size = max(size - data_start, 0)
    names = set()
    for name, offset, _ in tensors:
        if name in names:
            raise CorruptFileError(f"{path}: tensor {name!r} appears twice; {_FIX}")
        names.add(name)
        if offset % alignment:
            raise CorruptFileError(f"{path}: tensor {name!r} offset {offset:,} is not a multiple of the alignment "
                                   f"{alignment}; {_FIX}")
    end = max((offset + n for _, offset, n in tensors), default=0)
    if end > data_size:
        raise CorruptFileError(f"{path}: truncated: header says {end:,} bytes of tensor data, the file has "
                               f"{data_size:,}; {_FIX}")
    spans = sorted((offset, offset + n, name) for name, offset, n in tensors)
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CorruptFileError(f"{path}: tensors {name0!r} and {name1!r} overlap (data bytes {begin1:,} to "
                                   f"{end0:,}); {_FIX}")


def open_gguf(path: str | Path) -> GGUFReader:
    """A ``GGUFReader`` over ``path`` after ``validate_gguf``; a file it still rejects is a ``CorruptFileError``."""
    validate_gguf(path)
    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - whatever the gguf package trips on in a file that passed the checks
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptFileError(f"{path}: the gguf package cannot read it ({first}); {_FIX}") from e


def bits_per_weight(path: str | Path) -> tuple[float, float]:
    """(bits per weight of the language model's matmuls, of the whole file): what a file of a given size buys.
    The matmuls are the attention and MLP projections (``layout.MATMUL_ROLES``), the tensors every Q4 / Q8 scheme
    quantizes; the file's figure counts every byte (metadata, vocabulary, embedding, norms) over every weight."""
    reader = open_gguf(path)
    matmul_bytes = matmul_weights = weights = 0
    for t in reader.tensors:
        n = int(t.n_elements)
        weights += n
        if gguf_role(t.name) in MATMUL_ROLES:
            matmul_bytes += int(t.n_bytes)
            matmul_weights += n
    if not matmul_weights:
        raise InputError(f"{path} holds no attention or MLP weights under llama.cpp's names: not a Gemma 3 text GGUF")
    return 8 * matmul_bytes / matmul_weights, 8 * Path(path).stat().st_size / weights



def inspect_gguf(path: str | Path) -> dict:
    """Metadata (long arrays summarised), tensor table and totals of a GGUF file."""
    reader = open_gguf(path)  # validated first: a torn or corrupt file is one line naming it
    metadata = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if fld.types and fld.types[0] == GGUFValueType.ARRAY:
            n = len(fld.data)
            metadata[key] = f"[array of {n}]" if n > 8 else fld.contents()
        else:
            metadata[key] = fld.contents()
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape[::-1]],
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t["type"]] = by_type.get(t["type"], 0) + t["bytes"]
    return {"path": str(path), "file_bytes": Path(path).stat().st_size, "metadata": metadata, "tensors": tensors,
            "tensor_bytes": sum(t["bytes"] for t in tensors), "bytes_by_type": by_type}
