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
    """A ``datasets.Dataset`` with a ``text`` or a ``messages`` column."""
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
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
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
        raise DataError(f"{source.path} has no 'text' or 'messages' field; fields found: {', '.join(ds.column_names)}")
    return ds


def is_validation(text: str, percent: float) -> bool:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % 10_000 < percent * 100


_MODEL_TURN = re.compile(r"<start_of_turn>model\n(.*?<end_of_turn>)", re.S)


def _render(example: dict, tokenizer) -> str:
    if "messages" in example and example.get("messages"):
        return tokenizer.apply_chat_template(example["messages"], tokenize=False)
    return (tokenizer.bos_token or "") + example["text"] + (tokenizer.eos_token or "")


def tokenize_documents(ds, tokenizer, *, assistant_only: bool = False):
    """Columns ``input_ids`` and ``loss_mask`` (1 = a target token), and ``text`` (the rendered document)."""

    def encode(example):
        text = _render(example, tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=assistant_only)
        ids = enc["input_ids"]
        if assistant_only and "messages" in example and example.get("messages"):
            spans = [m.span(1) for m in _MODEL_TURN.finditer(text)]
            mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
        else:
            mask = [1] * len(ids)
        return {"input_ids": ids, "loss_mask": mask, "rendered": text}

    return ds.map(encode, remove_columns=ds.column_names, desc="tokenizing")


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
        docs = tokenize_documents(load_documents(src), tokenizer, assistant_only=assistant_only)
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
