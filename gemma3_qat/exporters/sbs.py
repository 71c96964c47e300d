"""gemma.cpp's single-file ``.sbs`` container: BlobStore V2, the ``IFields`` encoding, ``ModelConfig`` and ``toc``.

Pure byte layout, no torch (``docs/specs/gemma-cpp-sbs.md`` §1-3, verified in gemma.cpp 3ed403e, see
``gemma-cpp-findings.md``). Both directions live here so that the writer and the reader cannot drift apart:

* the container: a dummy 16-byte header padded to 256, the blobs back to back at 256-byte offsets (in directory
  order: the loader checks that blob ``i`` starts exactly where blob ``i-1``'s padding ends), zero padding to a
  multiple of 64 KiB (so that gemma.cpp can mmap it), then the directory (16-byte names, then ``(offset, size)``
  u64 pairs) and the real header as the last 16 bytes;
* ``IFields``: everything is little-endian u32 words; a nested struct is its word count, then its fields;
* ``ModelConfig`` / ``LayerConfig`` in ``VisitFields`` order, and one ``MatPtr`` record per tensor in ``toc``.

``SbsWriter`` streams: the caller declares every blob's size up front (it is known from the plan) and then
writes each blob's bytes in chunks; nothing larger than a chunk is held.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gemma3_qat.errors import CorruptFileError, InputError

MAGIC = 0x0A534253  # "SBS\n"
BLOB_ALIGN = 256
END_ALIGN = 1 << 16
KEY_BYTES = 16
MAX_BLOBS = 16 * 1024
HEADER = struct.Struct("<IIQ")  # magic, num_blobs, file_bytes

# enum Type (compression/types.h) and its element bytes
TYPES = {"F32": 1, "BF16": 2, "SFP": 3, "NUQ": 4, "F64": 5, "U32": 6, "U64": 7, "I8": 8}
TYPE_NAMES = {v: k for k, v in TYPES.items()}
ELEMENT_BYTES = {"F32": 4, "BF16": 2, "SFP": 1, "F64": 8, "U32": 4, "U64": 8, "I8": 1}
TYPE_BITS = {"SFP": 8, "I8": 8, "BF16": 16, "F32": 32, "U32": 32, "F64": 64, "U64": 64}

# enum Model: the four Gemma 3 values make global layers use RoPE base 1e6 (IsVLM); 18 (270M) does not
MODEL_GEMMA3_1B = 15
MODELS = {"GEMMA3_1B": MODEL_GEMMA3_1B}  # the identities we write (models.Architecture.gemma_cpp_identity)
GEMMA3_MODELS = (14, 15, 16, 17)
WRAPPING = {"it": 0, "pt": 1, "vlm": 2}
QUERY_SCALE = {"sqrt_key_size": 0, "sqrt_model_dim_div_num_heads": 1}


def _round_up(x: int, align: int) -> int:
    return (x + align - 1) // align * align


# ------------------------------------------------------------------------------------------------- IFields words


class Words:
    """An ``IFields`` word sequence under construction (u32, little-endian when serialized)."""

    def __init__(self):
        self.words: list[int] = []

    def u32(self, value: int) -> "Words":
        if not 0 <= int(value) < 1 << 32:
            raise InputError(f"{value} does not fit a gemma.cpp u32 config field")
        self.words.append(int(value))
        return self

    def i32(self, value: int) -> "Words":
        return self.u32(int(value) & 0xFFFFFFFF)

    def f32(self, value: float) -> "Words":
        packed = struct.pack("<f", value)
        if struct.unpack("<f", packed)[0] != struct.unpack("<f", packed)[0] or abs(value) == float("inf"):
            raise InputError(f"gemma.cpp rejects non-finite floats in its config, got {value}")
        return self.u32(struct.unpack("<I", packed)[0])

    def string(self, text: str) -> "Words":
        """``ceil(len/4)`` then the bytes packed in words; ASCII, at most 64 words, no zero word (its rules)."""
        data = text.encode("ascii")
        n = (len(data) + 3) // 4
        if n > 64:
            raise InputError(f"gemma.cpp strings hold at most 256 characters, got {len(data)}: {text[:40]!r}...")
        self.u32(n)
        for (w,) in struct.iter_unpack("<I", data.ljust(4 * n, b"\0")):
            if w == 0:
                raise InputError(f"gemma.cpp strings may not hold NUL words: {text!r}")
            self.u32(w)
        return self

    def nested(self, inner: "Words") -> "Words":
        self.u32(len(inner.words))
        self.words.extend(inner.words)
        return self

    def to_bytes(self) -> bytes:
        return struct.pack(f"<{len(self.words)}I", *self.words)


class _Reader:
    """Reads an ``IFields`` word sequence back (the inspector's and the tests' view of a file)."""

    def __init__(self, data: bytes, what: str):
        if len(data) % 4:
            raise CorruptFileError(f"{what}: {len(data)} bytes is not a whole number of u32 words")
        self.words = struct.unpack(f"<{len(data) // 4}I", data)
        self.pos, self.what = 0, what

    def u32(self) -> int:
        if self.pos >= len(self.words):
            raise CorruptFileError(f"{self.what}: ends in the middle of a record; the file is corrupt")
        self.pos += 1
        return self.words[self.pos - 1]

    def i32(self) -> int:
        v = self.u32()
        return v - (1 << 32) if v & 0x80000000 else v

    def f32(self) -> float:
        return struct.unpack("<f", struct.pack("<I", self.u32()))[0]

    def string(self) -> str:
        n = self.u32()
        raw = struct.pack(f"<{n}I", *(self.u32() for _ in range(n)))
        return raw.rstrip(b"\0").decode("ascii", errors="replace")

    def nested_end(self) -> int:
        n = self.u32()
        return self.pos + n


# ------------------------------------------------------------------------------------------------- ModelConfig


@dataclass(frozen=True)
class LayerConfig:
    """gemma.cpp ``LayerConfig`` of a Gemma 3 decoder layer (15 words). Defaults: Gemma 3's fixed choices."""

    model_dim: int
    ff_hidden_dim: int
    heads: int
    kv_heads: int
    qkv_dim: int
    ff_biases: bool = False
    optimized_gating: bool = True
    post_norm: int = 1  # Scale: the post-attention / post-FFN RMSNorms
    type: int = 0  # kGemma
    activation: int = 0  # Gelu (the tanh approximation, like gelu_pytorch_tanh)
    post_qk: int = 0  # Rope
    use_qk_norm: bool = True

    def words(self) -> Words:
        w = Words()
        for v in (self.model_dim, 0, self.ff_hidden_dim, self.heads, self.kv_heads, self.qkv_dim, 0,
                  self.ff_biases, 0, self.optimized_gating, self.post_norm, self.type, self.activation,
                  self.post_qk, self.use_qk_norm):
            w.u32(int(v))
        return w


@dataclass(frozen=True)
class ModelConfig:
    """gemma.cpp ``ModelConfig`` as ``VisitFields`` serializes it; text-only (an empty ``vit_config``).

    ``attention_window_sizes``: per layer; a layer whose window equals ``max_seq_len`` is a global layer (that
    equality is how gemma.cpp tells them apart). ``scale_base_names`` is only read for pre-2025 files: empty.
    """

    display_name: str
    model: int
    wrapping: int
    weight: int  # enum Type: the lowest-bit type of any tensor (the loader checks it)
    model_dim: int
    vocab_size: int
    max_seq_len: int
    layer_configs: tuple[LayerConfig, ...]
    attention_window_sizes: tuple[int, ...]
    query_scale: int = 0
    eos_id: int = 1
    secondary_eos_id: int = 106
    att_cap: float = 0.0
    final_cap: float = 0.0
    model_family_version: int = 1

    def __post_init__(self):
        if len(self.layer_configs) != len(self.attention_window_sizes):
            raise InputError(f"{len(self.layer_configs)} layer configs but {len(self.attention_window_sizes)} "
                             "attention windows")
        if self.weight not in TYPE_NAMES or self.wrapping not in WRAPPING.values():
            raise InputError(f"invalid gemma.cpp weight type {self.weight} or wrapping {self.wrapping}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_configs)

    def words(self) -> Words:
        w = Words().u32(self.model_family_version).string(self.display_name).u32(self.model).u32(self.wrapping)
        w.u32(self.weight).u32(self.num_layers).u32(self.model_dim).u32(self.vocab_size).u32(self.max_seq_len)
        w.u32(0).f32(self.att_cap).f32(self.final_cap).u32(0).u32(0).u32(self.query_scale)
        w.u32(self.num_layers)
        for layer in self.layer_configs:
            w.nested(layer.words())
        w.u32(self.num_layers)
        for window in self.attention_window_sizes:
            w.u32(window)
        w.u32(1)  # norm_num_groups
        w.nested(Words().u32(0).u32(0).u32(0).u32(14).u32(224).u32(0).u32(1))  # VitConfig defaults, no layers
        w.u32(1).i32(self.eos_id).i32(self.secondary_eos_id)  # pool_dim, eos ids
        w.u32(0)  # scale_base_names: none
        return w

    def to_bytes(self) -> bytes:
        return Words().nested(self.words()).to_bytes()


def read_model_config(data: bytes) -> dict:
    """The ``config`` blob as a dict of gemma.cpp's field names (trailing fields a newer writer adds are kept
    out, as gemma.cpp's reader skips them)."""
    r = _Reader(data, "config blob")
    end = r.nested_end()
    out = {"model_family_version": r.u32(), "display_name": r.string(), "model": r.u32(), "wrapping": r.u32(),
           "weight": TYPE_NAMES.get(r.u32(), "?"), "num_layers": r.u32(), "model_dim": r.u32(),
           "vocab_size": r.u32(), "max_seq_len": r.u32()}
    r.u32()
    out["att_cap"], out["final_cap"] = r.f32(), r.f32()
    out["absolute_pe"], _ = r.u32(), r.u32()
    out["query_scale"] = r.u32()
    layers = []
    for _ in range(r.u32()):
        stop = r.nested_end()
        vals = [r.u32() for _ in range(stop - r.pos)]
        keys = ("model_dim", "griffin_dim", "ff_hidden_dim", "heads", "kv_heads", "qkv_dim", "conv1d_width",
                "ff_biases", "softmax_attn_output_biases", "optimized_gating", "post_norm", "type", "activation",
                "post_qk", "use_qk_norm")
        layers.append(dict(zip(keys, vals)))
    out["layer_configs"] = layers
    out["attention_window_sizes"] = [r.u32() for _ in range(r.u32())]
    out["norm_num_groups"] = r.u32()
    stop = r.nested_end()
    out["vit_layers"] = None
    r.pos = stop  # text-only exports: the ViT config is its defaults
    out["pool_dim"] = r.u32()
    out["eos_word"] = r.pos  # where eos_id sits (secondary_eos_id follows): the runtime patches both
    out["eos_id"], out["secondary_eos_id"] = r.i32(), r.i32()
    out["scale_base_names"] = [r.string() for _ in range(r.u32())] if r.pos < end else []
    return out


def expected_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """The tensors (our split form) a Gemma 3 text ``ModelConfig`` implies, with gemma.cpp's 2-D shapes."""
    d, v = config["model_dim"], config["vocab_size"]
    out = {"c_embedding": (v, d), "c_final_norm": (1, d)}
    for i, c in enumerate(config["layer_configs"]):
        f, h, k, dh = c["ff_hidden_dim"], c["heads"], c["kv_heads"], c["qkv_dim"]
        out.update({f"pre_att_ns_{i}": (1, d), f"post_att_ns_{i}": (1, d), f"pre_ff_ns_{i}": (1, d),
                    f"post_ff_ns_{i}": (1, d), f"query_norm_{i}": (1, dh), f"key_norm_{i}": (1, dh),
                    f"qkv1_w_{i}": (h * dh, d), f"qkv2_w_{i}": (2 * k * dh, d), f"att_w_{i}": (d, h * dh),
                    f"gating1_w_{i}": (f, d), f"gating2_w_{i}": (f, d), f"linear_w_{i}": (d, f)})
    return out


# ------------------------------------------------------------------------------------------------- toc


@dataclass(frozen=True)
class MatRecord:
    """One ``MatPtr`` record of ``toc``: what the loader reads of a tensor (name, type, rows, cols, scale)."""

    name: str
    type: str  # a key of TYPES
    rows: int
    cols: int
    scale: float = 1.0

    def __post_init__(self):
        if not 0 < len(self.name.encode("ascii")) <= KEY_BYTES:
            raise InputError(f"gemma.cpp tensor names are 1-16 ASCII characters, got {self.name!r}")
        if self.type not in ELEMENT_BYTES:
            raise InputError(f"unknown gemma.cpp tensor type {self.type!r}")

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * ELEMENT_BYTES[self.type]

    def words(self) -> Words:
        w = Words().string(self.name).u32(TYPES[self.type]).u32(ELEMENT_BYTES[self.type])
        return w.u32(self.rows * self.cols).u32(self.rows).u32(self.cols).f32(self.scale).u32(self.cols)


def toc_bytes(records: list[MatRecord]) -> bytes:
    out = Words()
    for rec in records:
        out.nested(rec.words())
    return out.to_bytes()


def read_toc(data: bytes) -> list[dict]:
    r = _Reader(data, "toc blob")
    out = []
    while r.pos < len(r.words):
        end = r.nested_end()
        rec = {"name": r.string(), "type": TYPE_NAMES.get(r.u32(), "?"), "element_bytes": r.u32(),
               "num_elements": r.u32(), "rows": r.u32(), "cols": r.u32(), "scale": r.f32(), "stride": r.u32()}
        r.pos = end
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------------- container


class SbsWriter:
    """Streams a BlobStore V2 file: ``declare`` every blob (name, size) first, then ``write`` their bytes in
    declaration order (any number of chunks per blob), then ``close``. The sizes are checked as it goes."""

    def __init__(self, f: BinaryIO, blobs: list[tuple[str, int]]):
        names = [n for n, _ in blobs]
        if len(set(names)) != len(names):
            raise InputError("gemma.cpp blob names must be unique")
        if not 0 < len(blobs) < MAX_BLOBS:
            raise InputError(f"gemma.cpp files hold 1 to {MAX_BLOBS - 1} blobs, got {len(blobs)}")
        self.f, self.blobs = f, blobs
        self.keys = []
        for name, size in blobs:
            if not 0 < len(name.encode("ascii")) <= KEY_BYTES or size <= 0:
                raise InputError(f"gemma.cpp blob {name!r}: names are 1-16 ASCII characters, sizes nonzero")
            self.keys.append(name.encode("ascii").ljust(KEY_BYTES, b"\0"))
        self.offsets, off = [], BLOB_ALIGN
        for _, size in blobs:
            self.offsets.append(off)
            off = _round_up(off + size, BLOB_ALIGN)
        n = len(blobs)
        self.file_bytes = _round_up(off + _round_up(16 + 32 * n, BLOB_ALIGN), END_ALIGN)
        self._end_of_blobs = off
        self._index, self._written = 0, 0
        f.write(HEADER.pack(MAGIC, 0, END_ALIGN).ljust(BLOB_ALIGN, b"\0"))  # V2's fixed dummy header

    def write(self, data: bytes | memoryview) -> None:
        name, size = self.blobs[self._index]
        if self._written + len(data) > size:
            raise InputError(f"internal error: blob {name!r} got more than its declared {size} bytes")
        self.f.write(data)
        self._written += len(data)
        if self._written == size:
            self.f.write(b"\0" * (_round_up(size, BLOB_ALIGN) - size))
            self._index, self._written = self._index + 1, 0

    def close(self) -> None:
        if self._index != len(self.blobs):
            name, size = self.blobs[self._index]
            raise InputError(f"internal error: blob {name!r} got {self._written} of its {size} bytes")
        n = len(self.blobs)
        tail = b"".join(self.keys) + b"".join(struct.pack("<QQ", off, size) for off, (_, size)
                                              in zip(self.offsets, self.blobs))
        tail += HEADER.pack(MAGIC, n, self.file_bytes)
        self.f.write(b"\0" * (self.file_bytes - self._end_of_blobs - len(tail)))
        self.f.write(tail)


def file_bytes_of(blob_sizes: list[int]) -> int:
    """The size of a V2 file holding blobs of these sizes (the memory model's and the dry run's arithmetic)."""
    end = BLOB_ALIGN + sum(_round_up(s, BLOB_ALIGN) for s in blob_sizes)
    return _round_up(end + _round_up(16 + 32 * len(blob_sizes), BLOB_ALIGN), END_ALIGN)


@dataclass
class SbsFile:
    """A parsed ``.sbs``: its directory (name -> (offset, size)), config, toc and file size; blobs read on demand."""

    path: Path
    file_bytes: int
    blobs: dict[str, tuple[int, int]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    toc: list[dict] = field(default_factory=list)

    def read_blob(self, name: str) -> bytes:
        off, size = self.blobs[name]
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(size)


def read_sbs(path: str | Path) -> SbsFile:
    """Parse and validate a V2 (or V1) ``.sbs`` file as gemma.cpp's reader does; one-line errors name the file."""
    path = Path(path)
    size = path.stat().st_size

    def corrupt(what: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: {what}; not a complete gemma.cpp .sbs file: export it again")

    if size < BLOB_ALIGN + HEADER.size:
        raise corrupt(f"{size} bytes is too short")
    with open(path, "rb") as f:
        magic, n, fb = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise corrupt("no SBS magic at the start")
        v1 = n != 0
        if not v1:
            f.seek(size - HEADER.size)
            magic, n, fb = HEADER.unpack(f.read(HEADER.size))
            if magic != MAGIC:
                raise corrupt("no SBS header at the end (truncated?)")
        if fb != size:
            raise corrupt(f"header says {fb:,} bytes, the file has {size:,}")
        if not 0 < n < MAX_BLOBS:
            raise corrupt(f"{n} blobs")
        f.seek(HEADER.size if v1 else size - HEADER.size - 32 * n)
        keys = f.read(KEY_BYTES * n)
        ranges = f.read(16 * n)
    sbs = SbsFile(path, size)
    expected = None if v1 else BLOB_ALIGN
    for i in range(n):
        name = keys[i * KEY_BYTES:(i + 1) * KEY_BYTES].rstrip(b"\0").decode("ascii", errors="replace")
        off, length = struct.unpack_from("<QQ", ranges, 16 * i)
        if off % BLOB_ALIGN or off + length > size or length == 0 or (expected is not None and off != expected):
            raise corrupt(f"blob {name!r} at {off:,} (+{length:,}) is misplaced")
        expected = _round_up(off + length, BLOB_ALIGN)
        sbs.blobs[name] = (off, length)
    if "config" in sbs.blobs:
        sbs.config = read_model_config(sbs.read_blob("config"))
    if "toc" in sbs.blobs:
        sbs.toc = read_toc(sbs.read_blob("toc"))
        for rec in sbs.toc:
            if rec["name"] not in sbs.blobs:
                raise corrupt(f"toc lists {rec['name']!r}, which has no blob")
    return sbs
