"""The teacher cache: run the teacher once, store its sparse targets, train any format without it in memory.

    gemma3-qat teacher-cache --kd topk --kd-k 256 -o cache/          # same data flags as train
    gemma3-qat train --format int4-block --teacher-cache cache/ --kd topk --kd-k 256

Stored per packed row, as an Arrow dataset (``datasets``): the row id, for each position the ``k`` ids and the log
of their target weights (exactly the live ``sampled`` / ``topk`` target, see ``distill``), and the teacher's top-1
id (for validation agreement). Bytes per token: ``k * 8 + 4`` (int32 ids, fp32 log-probabilities, top-1): 2,052
for k = 256, against 524,288 for full fp16 logits over Gemma 3's 262,144-token vocabulary. One cache serves all
three formats. A fingerprint of teacher, tokenizer, packed data and KD settings guards against mixing them up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from gemma3_qat.qat.distill import KDConfig, SparseTarget, teacher_targets
from gemma3_qat.errors import InputError, MissingFileError

CACHE_VERSION = 2  # 2: unbiased sampled targets, top-k with its tail class
META = "teacher-cache.json"


def _hash_file(path: Path, limit: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(limit))  # the head of large weight files: with the size, enough to tell checkpoints apart
    h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


def fingerprint(teacher_source: str, train_data, valid_data, kd: KDConfig) -> dict:
    teacher = Path(teacher_source)
    if teacher.exists():
        files = sorted(p for p in teacher.iterdir() if p.suffix in (".json", ".model", ".safetensors"))
        teacher_id = hashlib.sha256("".join(_hash_file(p) for p in files).encode()).hexdigest()[:16]
    else:
        teacher_id = teacher_source  # a hub id
    data = hashlib.sha256()
    for part in (train_data.input_ids, train_data.labels, valid_data.input_ids, valid_data.labels):
        data.update(part.numpy().tobytes())
    return {"version": CACHE_VERSION, "teacher": teacher_id, "data": data.hexdigest()[:16], "kd_mode": kd.mode,
            "kd_k": kd.k, "kd_temperature": kd.temperature, "kd_seed": kd.seed}


def _features(seq_len: int, k: int):
    from datasets import Array2D, Features, Sequence, Value

    return Features({"row": Value("int64"), "ids": Array2D((seq_len - 1, k), "int32"),
                     "log_probs": Array2D((seq_len - 1, k), "float32"),
                     "top1": Sequence(Value("int32"), length=seq_len - 1)})


@torch.no_grad()
def build_teacher_cache(teacher, train_data, valid_data, kd: KDConfig, output: Path, fp: dict, *,
                        batch_size: int = 8, device=None, log=print) -> Path:
    """Write ``output/{train,valid}.arrow`` and the metadata. ``output`` must be a fresh directory."""
    from datasets.arrow_writer import ArrowWriter

    if kd.mode == "full":
        raise InputError("a teacher cache stores sparse targets: use --kd topk or --kd sampled (full-vocabulary "
                         "targets are what the cache exists to avoid)")
    device = device or next(teacher.parameters()).device
    seq_len = train_data.input_ids.shape[1]
    k = min(kd.k, teacher.config.get_text_config().vocab_size)
    output.mkdir(parents=True, exist_ok=True)
    for split, data in (("train", train_data), ("valid", valid_data)):
        with ArrowWriter(features=_features(seq_len, k), path=str(output / f"{split}.arrow")) as writer:
            for start in range(0, len(data), batch_size):
                rows = torch.arange(start, min(start + batch_size, len(data)))
                # the teacher's head per chunk of positions: no [batch x seq x vocab] logits (distill.teacher_targets)
                target, top1 = teacher_targets(teacher, data.input_ids[rows].to(device), kd, sample_ids=rows)
                writer.write_batch({
                    "row": rows.numpy(),
                    "ids": list(target.ids.to(torch.int32).cpu().numpy()),
                    "log_probs": list(target.log_probs.float().cpu().numpy()),
                    "top1": list(top1.to(torch.int32).cpu().numpy()),
                })
                log(f"teacher cache {split}: {rows[-1] + 1}/{len(data)} rows")
            writer.finalize()
    tokens = (len(train_data) + len(valid_data)) * (seq_len - 1)
    size = sum(p.stat().st_size for p in output.glob("*.arrow"))
    meta = {**fp, "seq_len": seq_len, "k": k, "rows": {"train": len(train_data), "valid": len(valid_data)},
            "bytes_per_token": round(size / tokens, 1)}
    (output / META).write_text(json.dumps(meta, indent=2) + "\n")
    return output


class TeacherCache:
    def __init__(self, path: Path, meta: dict):
        from datasets import Dataset

        self.path, self.meta = path, meta
        self.splits = {s: Dataset.from_file(str(path / f"{s}.arrow")).with_format("numpy") for s in ("train", "valid")}

    @classmethod
    def open(cls, path: str | Path, expected: dict) -> "TeacherCache":
        path = Path(path)
        if not (path / META).exists():
            raise MissingFileError(f"{path} is not a teacher cache (no {META}); build one with gemma3-qat teacher-cache")
        meta = json.loads((path / META).read_text())
        diffs = [f"{k} {meta.get(k)!r} != {v!r}" for k, v in expected.items() if meta.get(k) != v]
        if diffs:
            raise InputError(f"teacher cache {path} was built for another teacher, data or KD setting ({'; '.join(diffs)}); "
                             "rebuild it with the same --model/--teacher/--data/--seq-len/--kd flags as this run")
        return cls(path, meta)

    def _rows(self, rows: torch.Tensor, split: str) -> dict:
        batch = self.splits[split][rows.tolist()]
        return batch

    def target(self, rows: torch.Tensor, split: str, device) -> SparseTarget:
        batch = self._rows(rows, split)
        return SparseTarget(torch.from_numpy(np.asarray(batch["ids"])).long().to(device),
                            torch.from_numpy(np.asarray(batch["log_probs"])).float().to(device))

    def top1(self, rows: torch.Tensor, split: str, device) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._rows(rows, split)["top1"])).long().to(device)


def build_from_config(config, output: str | Path, *, force: bool = False, batch_size: int = 8, log=print) -> Path:
    """``gemma3-qat teacher-cache``: the same model/data/KD flags as ``train`` (the same run setup,
    ``data.setup_run_data``, so the fingerprints agree); writes the cache atomically."""
    from gemma3_qat.checkpoint import atomic_directory
    from gemma3_qat.qat.data import setup_run_data
    from gemma3_qat.qat.distill import load_teacher

    run = setup_run_data(config, log=log)
    kd = config.kd_config
    fp = fingerprint(run.teacher_source, run.train, run.valid, kd)
    teacher = load_teacher(run.teacher_source)
    with atomic_directory(output, force=force) as tmp:
        build_teacher_cache(teacher, run.train, run.valid, kd, tmp, fp, batch_size=batch_size, log=log)
    meta = json.loads((Path(output) / META).read_text())
    log(f"teacher cache: {output} ({meta['bytes_per_token']} bytes per token, k = {meta['k']})")
    return Path(output)
