"""Training data: local ``.jsonl/.json/.parquet/.txt`` files or hub datasets, plain ``text`` or chat ``messages``
(rendered with the tokenizer's chat template), mixed by weight, packed to a fixed length.

* Split: a document goes to validation when ``sha1(text) % 100 < validation_percent``: deterministic, and stable
  when files are reordered or grow.
* Packing: documents are concatenated and cut into ``seq_len`` rows. The label of the first token of each document
  is -100 (nothing predicts across a boundary), as are padding and, with ``assistant_only``, everything outside the
  model's turns. Attention is not blocked at boundaries (the usual packing simplification).
* Tokenization is cached by ``datasets`` (its fingerprinted map cache) for file-based sources.
* Every packed row has a stable id (its index in the concatenation of all sources' rows); the sampler draws rows by
  mixture weight from a seeded generator, so the rows at step ``s`` are a pure function of (seed, s): resume is
  exact and the same global batch splits across any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gemma3_qat.errors import InputError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


class DataError(InputError):
    """Data that cannot be used for training, with what to do about it."""


@dataclass(frozen=True)
class DataSource:
    path: str
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "DataSource":
        """``PATH`` or ``PATH:WEIGHT`` (the weight is optional; a hub id may contain ':' only before a number)."""
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                return cls(spec)
            if weight <= 0:
                raise DataError(f"mixture weight in {spec!r} must be positive")
            return cls(head, weight)
        return cls(spec)


def load_documents(source: DataSource):
    """A ``datasets.Dataset`` with a ``text`` or a ``messages`` column.

    A local file that ``datasets`` cannot read is a one-line ``DataError`` naming the file and, for JSON, the
    first bad line (found by ``_find_bad_json_line`` only after a failure: the happy path reads the file once).
    """
    import datasets

    path = Path(source.path)
    if path.exists():
        if path.is_dir():
            raise DataError(f"{path} is a directory; pass the data files themselves (--data a.jsonl --data b.txt)")
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use {', '.join(_BUILDERS)}")
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty")
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        # the JSON builder logs its parse error before raising it: our one line replaces that line
        json_logger = logging.getLogger("datasets.packaged_modules.json.json")
        level = json_logger.level
        json_logger.setLevel(logging.CRITICAL)
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # datasets wraps the parser's error in DatasetGenerationError; find the real one
            if builder == "json" and (bad := _find_bad_json_line(path)):
                raise DataError(bad) from e
            raise DataError(f"{path}: cannot be read as {path.suffix} data ({_innermost(e)}); check that it is a "
                            f"valid {path.suffix} file") from e
        finally:
            json_logger.setLevel(level)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source.path):
        try:
            ds = datasets.load_dataset(source.path, split="train")
        except Exception as e:  # offline, unknown id, gated ...
            raise DataError(f"cannot load hub dataset {source.path!r} ({type(e).__name__}); are you offline? "
                            "pass a local .jsonl/.parquet/.txt file instead") from None
    else:
        raise DataError(f"data file {source.path} does not exist")
    if len(ds) == 0:
        raise DataError(f"{source.path} holds no rows")
    if "text" not in ds.column_names and "messages" not in ds.column_names:
        raise DataError(f"{source.path} has no 'text' or 'messages' field; fields found: "
                        f"{', '.join(ds.column_names)}")
    return ds


def _innermost(exc: BaseException) -> str:
    """The first line of the innermost cause: ``datasets`` says only "An error occurred while generating ..."."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        exc = inner
        seen.add(id(exc))
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


_EXPECTED = ('expected {"text": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}')


def _find_bad_json_line(path: Path) -> str | None:
    """The first line of a JSON Lines file that is not a JSON object or whose row does not match the others'
    fields' kinds (what made ``datasets`` fail), as a message; None if every line is fine."""
    kinds: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(4096).lstrip()[:1] == b"[":  # one JSON document, an array of rows, rather than JSON Lines
            f.seek(0)
            try:
                rows = json.loads(f.read().decode("utf-8"))
            except json.JSONDecodeError as e:
                return f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); {_EXPECTED}"
            except UnicodeDecodeError:
                return f"{path}: not UTF-8 text; save it as UTF-8"
            for i, row in enumerate(rows):
                if problem := (_row_problem(row) if isinstance(row, dict) else f"a JSON {type(row).__name__}, "
                               f"not an object; {_EXPECTED}"):
                    return f"{path} row {i + 1}: {problem}"
            return None
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
            except UnicodeDecodeError:
                return f"{path} line {lineno}: not UTF-8 text; save the file as UTF-8"
            except json.JSONDecodeError as e:
                return f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); {_EXPECTED}"
            if not isinstance(row, dict):
                return f"{path} line {lineno}: a JSON {type(row).__name__}, not an object; {_EXPECTED}"
            if problem := _row_problem(row):
                return f"{path} line {lineno}: {problem}"
            for key, value in row.items():  # datasets needs one kind per field across the file
                kind = _json_kind(value)
                if kind != "null" and kinds.setdefault(key, kind) != kind:
                    return (f"{path} line {lineno}: field {key!r} is a {kind}, earlier lines have a "
                            f"{kinds[key]}; give it the same kind on every line")
    return None


def _json_kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _row_problem(example: dict) -> str | None:
    """What is wrong with a row, in words (None if it can be rendered): the checks ``_render`` relies on."""
    messages, text = example.get("messages"), example.get("text")
    if messages is not None and messages != []:
        if not isinstance(messages, list):
            return f"'messages' is a {_json_kind(messages)}, expected a list of {{role, content}} objects"
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return f"message {j + 1} has no 'role' string; expected {{\"role\": ..., \"content\": \"...\"}}"
            content = m.get("content")
            if not isinstance(content, str) and not (isinstance(content, list) and all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                    for p in content)):
                return (f"message {j + 1} ({m['role']}): 'content' is a {_json_kind(content)}, expected a string "
                        "(or a list of {\"type\": \"text\", \"text\": \"...\"} parts)")
        return None
    if text is None:
        return f"no 'text' and no 'messages'; {_EXPECTED}"
    if not isinstance(text, str):
        return f"'text' is a {_json_kind(text)}, expected a string"
    return None


def _where(path: str | None, row: int) -> str:
    """"FILE line N" for a JSON Lines file (``datasets`` skips blank lines, so rows and lines can differ), else
    "FILE row N"; only computed for an error."""
    name = path or "data"
    if path and Path(path).suffix == ".jsonl" and Path(path).is_file():
        with open(path, "rb") as f:
            seen = -1
            for lineno, raw in enumerate(f, 1):
                seen += bool(raw.strip())
                if seen == row:
                    return f"{name} line {lineno}"
    return f"{name} row {row + 1}"


def is_validation(text: str, percent: float) -> bool:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 10_000 < percent * 100


_MODEL_TURN = re.compile(r"<start_of_turn>model\n(.*?<end_of_turn>)", re.S)


def _render(example: dict, tokenizer) -> str:
    """The document's text: a chat row through the tokenizer's chat template, else BOS + text + EOS. A row that
    cannot be rendered is a ``DataError`` saying what was expected (the caller adds the file and line)."""
    if problem := _row_problem(example):
        raise DataError(problem)
    if example.get("messages"):
        try:
            return tokenizer.apply_chat_template(example["messages"], tokenize=False)
        except Exception as e:  # the template's own checks, e.g. "roles must alternate user/assistant"
            raise DataError(f"the chat template rejects these messages ({_innermost(e)})") from None
    return (tokenizer.bos_token or "") + example["text"] + (tokenizer.eos_token or "")


def _map_fingerprint(ds, tokenizer, assistant_only: bool) -> str:
    """The tokenization's cache key from what it depends on. Left to itself, ``datasets`` pickles the tokenizer to
    fingerprint the map: 25 s per run at Gemma 3's 262k vocabulary, more than the tokenization."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256(f"{getattr(ds, '_fingerprint', '')}|{assistant_only}|{tokenizer.bos_token}|"
                       f"{tokenizer.eos_token}|{getattr(tokenizer, 'chat_template', None)}".encode())
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    return h.hexdigest()[:32]


def tokenize_documents(ds, tokenizer, *, assistant_only: bool = False, path: str | None = None):
    """Columns ``input_ids`` and ``loss_mask`` (1 = a target token), and ``text`` (the rendered document).

    ``path``: the source's file or id, named in the error for a row that cannot be rendered."""

    def encode(example, row):
        try:
            text = _render(example, tokenizer)
        except DataError as e:  # name the file and line only when it is needed (a scan of the file)
            raise DataError(f"{_where(path, row)}: {e}") from None
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=assistant_only)
        ids = enc["input_ids"]
        if assistant_only and "messages" in example and example.get("messages"):
            spans = [m.span(1) for m in _MODEL_TURN.finditer(text)]
            mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
        else:
            mask = [1] * len(ids)
        return {"input_ids": ids, "loss_mask": mask, "rendered": text}

    try:
        return ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenizing",
                      new_fingerprint=_map_fingerprint(ds, tokenizer, assistant_only))
    except UnicodeDecodeError:  # pyarrow's JSON reader keeps invalid UTF-8; decoding a row is where it shows
        bad = _find_bad_json_line(Path(path)) if path and Path(path).suffix in (".json", ".jsonl") else None
        raise DataError(bad or f"{path or 'data'}: not UTF-8 text; save it as UTF-8") from None


@dataclass
class PackedData:
    input_ids: torch.Tensor  # [N, L] int64
    labels: torch.Tensor  # [N, L] int64, -100 = no loss
    source: torch.Tensor  # [N] index of the source each row came from

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack(tokenized_docs, seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = [], []
    for doc in tokenized_docs:
        d_ids, d_mask = doc["input_ids"], doc["loss_mask"]
        ids.extend(d_ids)
        labels.extend(t if m else -100 for t, m in zip(d_ids, d_mask))
        if d_ids:
            labels[len(labels) - len(d_ids)] = -100  # nothing predicts a document's first token
    n = -(-len(ids) // seq_len) if ids else 0
    padded = n * seq_len - len(ids)
    ids += [pad_id] * padded
    labels += [-100] * padded
    return (torch.tensor(ids, dtype=torch.long).view(n, seq_len),
            torch.tensor(labels, dtype=torch.long).view(n, seq_len))


def build_data(sources: list[DataSource], tokenizer, seq_len: int, *, validation_percent: float = 5.0,
               assistant_only: bool = False, log=print) -> tuple[PackedData, PackedData]:
    """Train and validation rows of every source, packed."""
    train_parts, valid_parts = [], []
    for i, src in enumerate(sources):
        docs = tokenize_documents(load_documents(src), tokenizer, assistant_only=assistant_only,
                                  path=src.path)
        in_valid = [is_validation(t, validation_percent) for t in docs["rendered"]]
        if len(docs) >= 2 and not any(in_valid):
            in_valid[-1] = True  # at least one validation document per source
        if all(in_valid):
            in_valid[0] = False
        train_docs = docs.select([j for j, v in enumerate(in_valid) if not v])
        valid_docs = docs.select([j for j, v in enumerate(in_valid) if v])
        for part, subset in ((train_parts, train_docs), (valid_parts, valid_docs)):
            ids, labels = pack(subset, seq_len, tokenizer.pad_token_id or 0)
            part.append((ids, labels, torch.full((ids.shape[0],), i, dtype=torch.long)))
        log(f"data: {src.path} (weight {src.weight:g}): {len(train_docs)} train / {len(valid_docs)} validation "
            f"documents, {train_parts[-1][0].shape[0]} / {valid_parts[-1][0].shape[0]} rows of {seq_len} tokens")

    def cat(parts):
        return PackedData(*(torch.cat([p[j] for p in parts]) for j in range(3)))

    train, valid = cat(train_parts), cat(valid_parts)
    if len(train) == 0:
        raise DataError("no training rows: the data is too small for one sequence")
    return train, valid


class MixtureSampler:
    """Row ids for each step: sources drawn by weight, rows of a source in per-pass shuffled order."""

    def __init__(self, data: PackedData, weights: list[float], seed: int):
        self.rows_by_source = [torch.nonzero(data.source == i).flatten() for i in range(len(weights))]
        present = [i for i, rows in enumerate(self.rows_by_source) if len(rows)]
        w = np.array([weights[i] for i in present], dtype=np.float64)
        self.sources, self.p = present, w / w.sum()
        self.seed = seed

    def rows_for_step(self, step: int, global_batch: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        picks = rng.choice(len(self.sources), size=global_batch, p=self.p)
        out = []
        for j, src_pos in enumerate(picks):
            rows = self.rows_by_source[self.sources[src_pos]]
            # position in an endless stream of per-pass permutations of this source's rows
            k = step * global_batch + j
            pass_index, within = divmod(k, len(rows))
            perm = np.random.default_rng([self.seed, self.sources[src_pos], pass_index]).permutation(len(rows))
            out.append(int(rows[perm[within]]))
        return torch.tensor(out, dtype=torch.long)


# ------------------------------------------------------------------------------------------------- one run's data


@dataclass
class RunData:
    """What a training run and a teacher cache built for it must agree on: the sources, the tokenizer and the
    packed rows (the cache's fingerprint hashes these rows)."""

    model_source: str  # local dir or hub id of the student's starting checkpoint
    teacher_source: str  # the unquantized reference (default: the model)
    tokenizer_dir: str  # local directory with the tokenizer files (downloaded for a hub id)
    tokenizer: object
    sources: list[DataSource]
    train: PackedData
    valid: PackedData


def setup_run_data(config, log=print) -> RunData:
    """The run setup shared by ``train`` and ``teacher-cache``, from a ``TrainConfig`` (duck-typed: ``model``,
    ``teacher``, ``data``, ``seq_len``, ``validation_percent``, ``assistant_only``). No ``model`` = the embedded
    default model; no ``data`` = its sample data."""
    from gemma3_qat.assets import sample_data_specs
    from gemma3_qat.sources import local_tokenizer_dir
    from gemma3_qat.sources import resolve_model
    from gemma3_qat.tokenizer import load_tokenizer

    model_source = resolve_model(config.model)
    teacher_source = resolve_model(config.teacher) if config.teacher else model_source
    tokenizer_dir = local_tokenizer_dir(model_source)
    tokenizer = load_tokenizer(tokenizer_dir)
    sources = [DataSource.parse(s) for s in (config.data or sample_data_specs())]
    train, valid = build_data(sources, tokenizer, config.seq_len, validation_percent=config.validation_percent,
                              assistant_only=config.assistant_only, log=log)
    return RunData(model_source, teacher_source, tokenizer_dir, tokenizer, sources, train, valid)
