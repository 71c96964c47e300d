"""Training-step cost of QAT, measured side by side in one run (each variant in its own process, for peak RSS).

    python benchmarks/train_step.py --shape 270m [--steps 4] [--batch 2]
    python benchmarks/train_step.py --shape embedded [--repeats 3]
    python benchmarks/train_step.py [--steps 4] [--batches 2 8]

``--shape 270m``: fp32 against bf16 autocast at the real gemma-3-270m configuration (random weights, Google's
262,144-piece tokenizer; the embedding is 168M of its 268M parameters), with the live teacher and from a teacher
cache, each variant in its own process through the trainer itself (``QATRecipe.setup`` and ``train_step``: its
recipe's sampled KD with the embedding on the Q4_0 grid, its precision rule, CPU allocator and fused AdamW),
``--batch`` x 256 tokens. Prints per variant the median step time, tokens/s, the peak RSS (VmHWM) and its growth
after setup, the peak ``gemma3-qat memory --training --device cpu --mixed-precision ...`` predicts, and the share
of one profiled step spent in matrix products and attention; then the ratios against the targets: bf16 >= 2x
faster than fp32 with a live teacher at no higher peak RSS, the planner within 15%.

``--shape embedded``: the shipped default model's train step under ``--mixed-precision auto`` against fp32 (and
forced bf16), the median of ``--repeats`` runs of each, alternating: auto must not be slower (5%).

At a Gemma 3 shape (vocab 8192, hidden 1024, FFN 4096, 6 layers, 8 heads, 4 KV heads, head_dim 128, sequences of
256 tokens, AdamW, fp32, this CPU), for a batch of 2 sequences and 4x that, prints the median step time of:

  plain      the same step without fake quantization (next-token loss)
  qat        our int4-block fake quantization (next-token loss)       -> (a) qat / plain, target <= 1.15
  torchao    torchao's int4 group-32 QAT (QATConfig + IntxFakeQuantizeConfig)   -> (b) the peer's ratio
  kd-live    QAT with the live teacher (topk KD, k=256)
  kd-cache   QAT from a teacher cache (same targets)                   -> (c) kd-cache / kd-live, target <= 0.8

and (d) the peak RSS of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture builders (tests/builders.py)

SHAPE = dict(vocab=8192, hidden=1024, ffn=4096, layers=6, heads=8, kv_heads=4, head_dim=128)
SEQ = 256
VARIANTS = ("plain", "qat", "torchao", "kd-live", "kd-cache")
KD_K = 256


def build_model(seed: int):
    import torch
    from transformers import Gemma3ForCausalLM

    from builders import tiny_text_config

    torch.manual_seed(seed)
    config = tiny_text_config(SHAPE["vocab"], hidden=SHAPE["hidden"], ffn=SHAPE["ffn"], layers=SHAPE["layers"],
                              heads=SHAPE["heads"], kv_heads=SHAPE["kv_heads"], head_dim=SHAPE["head_dim"],
                              sliding_window=128, context=1024)
    config.use_cache = False
    return Gemma3ForCausalLM(config).train()


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def trainer_config(model: str, data: str | None, precision: str, teacher_cache: str | None, steps: int, batch: int,
                   output: str):
    """The trainer's own configuration of a run on ``model``: its released-size recipe (270m: sampled KD, the
    embedding on the grid) or the default recipe, at batch x 256 tokens, no validation or checkpoint in the way."""
    from gemma3_qat.qat.train import TrainConfig, resolve_recipe

    choice = resolve_recipe(None, model, "int4-block")
    extra = {"data": [data]} if data else {}
    return TrainConfig.from_recipe(choice, model=model, steps=steps, batch_size=batch, micro_batch_size=batch,
                                   seq_len=SEQ, mixed_precision=precision, teacher_cache=teacher_cache,
                                   eval_every=10**6, eval_rows=1, save_every=10**6, output=output, **extra)


def run_trainer_variant(model: str | None, data: str | None, precision: str, cache: str | None, batch: int,
                        steps: int) -> dict:
    """One variant in this process (``model`` None: the embedded default): the trainer's setup (``QATRecipe.setup``: precision, CPU allocator, teacher,
    fused AdamW), then its ``train_step`` ``steps`` times (the first a warm-up) and one profiled step for the share
    of matmuls (matrix products and attention)."""
    from torch.profiler import ProfilerActivity, profile

    from gemma3_qat.qat.train import QATRecipe

    base = peak_rss_mb()  # torch and transformers loaded: what the models, optimizer and steps add comes after
    with tempfile.TemporaryDirectory() as out:
        recipe = QATRecipe(trainer_config(model, data, precision, cache, steps + 1, batch, out), force=True,
                           log=lambda *_: None)
        recipe.setup()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            recipe.train_step()
            recipe.step += 1
            times.append(time.perf_counter() - t0)
        peak = peak_rss_mb()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            recipe.train_step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        recipe.restore_signal_handlers()
        mode = recipe.precision.mode
    step_s = statistics.median(times[1:] or times)
    return {"precision": mode, "step_s": step_s, "tokens_per_s": batch * SEQ / step_s, "peak_rss_mb": peak,
            "base_rss_mb": base, "matmul_share": matmul / total if total else 0.0}


def predicted_peak_mb(model: str, precision: str, cache: bool, batch: int) -> float:
    """The training-memory planner's peak for the run (the 270m recipe's KD and embedding)."""
    from gemma3_qat.memory import training_memory
    from gemma3_qat.sources import source_architecture

    opts = dict(teacher="cache", kd="sampled") if cache else dict(teacher="live", kd="sampled")
    return training_memory(source_architecture(model), seq_len=SEQ, micro_batch=batch, device="cpu",
                           quantize_embeddings=True, mixed_precision=precision, **opts).peak / 2**20


def run_variant(variant: str, batch: int, steps: int, cache_dir: str) -> dict:
    import torch
    import torch.nn.functional as F

    from gemma3_qat.qat.distill import KDConfig, distillation_loss, shift_for_next_token, sparse_target
    from gemma3_qat.qat.prepare import prepare

    kd = KDConfig("topk", k=256)
    student = build_model(0)
    if variant in ("qat", "kd-live", "kd-cache"):
        prepare(student, "int4-block")
    elif variant == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        quantize_(student, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
    teacher = build_model(1).eval() if variant == "kd-live" else None
    cache = None
    if variant == "kd-cache":
        from gemma3_qat.qat.teacher_cache import TeacherCache

        cache = TeacherCache.open(cache_dir, expected={})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, SHAPE["vocab"], (steps * batch, SEQ), generator=gen)
    times = []
    for step in range(steps):
        rows = torch.arange(step * batch, (step + 1) * batch)
        x = data[rows]
        t0 = time.perf_counter()
        logits = student(input_ids=x).logits
        logits, labels = shift_for_next_token(logits, x)
        if variant in ("plain", "qat", "torchao"):
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
        else:
            if teacher is not None:
                with torch.no_grad():
                    target = sparse_target(teacher(input_ids=x).logits[:, :-1], kd)
            else:
                target = cache.target(rows, split="train", device="cpu")
            loss, _ = distillation_loss(logits, labels, kd, target=target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "batch": batch, "step_s": statistics.median(times[1:]),
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry over the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def build_cache(cache_dir: Path, rows: int, valid_rows: int = 1) -> None:
    """A top-k teacher cache of the rows the variants train on (the same seed draws the same ids); its validation
    split: the rows after them."""
    import torch

    from gemma3_qat.qat.data import PackedData
    from gemma3_qat.qat.distill import KDConfig
    from gemma3_qat.qat.teacher_cache import build_teacher_cache

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPE["vocab"], (rows + valid_rows, SEQ), generator=gen)
    data = PackedData(ids[:rows], ids[:rows].clone(), torch.zeros(rows, dtype=torch.long))
    valid = PackedData(ids[rows:], ids[rows:].clone(), torch.zeros(valid_rows, dtype=torch.long))
    with torch.no_grad():
        build_teacher_cache(build_model(1).eval(), data, valid, KDConfig("topk", k=KD_K), cache_dir, {},
                            batch_size=2, log=lambda *_: None)


def random_270m(tmp: Path) -> Path:
    """Random weights at gemma-3-270m's configuration with Google's tokenizer (bf16 safetensors, as released)."""
    from builders import build_random_gemma3

    from gemma3_qat.models import GEMMA3_SHAPES

    return build_random_gemma3(tmp / "model", GEMMA3_SHAPES["270m"])


def small_data(tmp: Path, rows: int) -> Path:
    """``rows`` documents of the embedded sample text (a teacher cache of them builds in minutes)."""
    from gemma3_qat.assets import default_model_path

    src = default_model_path() / "data" / "sample-text.jsonl"
    out = tmp / "data.jsonl"
    out.write_text("".join(src.read_text().splitlines(keepends=True)[:rows]))
    return out


def child(args, variant: str, precision: str, model: str, data: str | None, cache: str | None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--precision", precision, "--model", model,
                          "--data", data or "", "--cache", cache or "", "--batch", str(args.batch), "--steps",
                          str(args.steps)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{variant} {precision} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main_270m(args) -> None:
    """fp32 and bf16 side by side at the 270M shape: live teacher and teacher cache, each in its own process."""
    import torch

    from gemma3_qat.qat.precision import cpu_bf16_support
    from gemma3_qat.qat.teacher_cache import build_from_config

    print(f"# gemma-3-270m shape (random weights, Google's tokenizer), its recipe (sampled KD k={KD_K}, embedding on "
          f"the Q4_0 grid), batch {args.batch} x {SEQ} tokens, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, CPU bf16: {cpu_bf16_support() or 'none'}; {args.steps} steps per variant (the "
          "first a warm-up), the trainer's own setup and train_step")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, data = str(random_270m(tmp)), str(small_data(tmp, 24))
        cache = tmp / "cache"
        build_from_config(trainer_config(model, data, "auto", None, 1, args.batch, str(tmp / "c")), cache,
                          log=lambda *_: None)
        results = {}
        for teacher in ("live", "cache"):
            for precision in ("no", "bf16"):
                results[(teacher, precision)] = r = child(args, teacher, precision, model, data,
                                                          str(cache) if teacher == "cache" else None)
                r["predicted_mb"] = predicted_peak_mb(model, precision, teacher == "cache", args.batch)
    print(f"{'teacher':<8} {'precision':<9} {'step s':>7} {'tokens/s':>8} {'peak RSS MB':>11} {'growth MB':>9} "
          f"{'predicted':>9} {'pred/growth':>11} {'matmul share':>12}")
    for (teacher, precision), r in results.items():
        growth = r["peak_rss_mb"] - r["base_rss_mb"]
        print(f"{teacher:<8} {precision:<9} {r['step_s']:>7.2f} {r['tokens_per_s']:>8.1f} {r['peak_rss_mb']:>11.0f} "
              f"{growth:>9.0f} {r['predicted_mb']:>9.0f} {r['predicted_mb'] / growth:>11.3f} "
              f"{r['matmul_share']:>12.0%}")
    print()
    for teacher in ("live", "cache"):
        fp32, bf16 = results[(teacher, "no")], results[(teacher, "bf16")]
        speed, mem = fp32["step_s"] / bf16["step_s"], bf16["peak_rss_mb"] / fp32["peak_rss_mb"]
        verdict = (f" (target >= 2: {'holds' if speed >= 2 else 'MISSED'}), peak RSS {mem:.3f}x fp32's (target "
                   f"<= 1: {'holds' if mem <= 1 else 'MISSED'})") if teacher == "live" else f", peak RSS {mem:.3f}x"
        print(f"{teacher} teacher: bf16 step {speed:.2f}x faster than fp32" + verdict)
    for (teacher, precision), r in results.items():
        ratio = r["predicted_mb"] / (r["peak_rss_mb"] - r["base_rss_mb"])
        print(f"planner, {teacher} {precision}: predicted / measured growth {ratio:.3f} (target within 15%: "
              f"{'holds' if abs(ratio - 1) <= 0.15 else 'MISSED'})")


def main_embedded(args) -> None:
    """The embedded default model under ``--mixed-precision auto`` against fp32: median of ``--repeats`` runs,
    alternating, each in its own process."""
    from gemma3_qat.qat.precision import choose_precision
    from gemma3_qat.sources import source_architecture

    auto = choose_precision("auto", cuda=False, hidden=source_architecture(None).hidden)
    print(f"# the embedded default model, its default recipe, batch {args.batch} x {SEQ} tokens; auto here: "
          f"{auto.why}")
    runs = {"no": [], "auto": [], "bf16": []}
    for _ in range(args.repeats):
        for precision in runs:
            runs[precision].append(child(args, "embedded", precision, "", None, None)["step_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"{k:<5} step s {med[k]:.3f} (runs {', '.join(f'{x:.3f}' for x in v)})")
    print(f"auto / fp32 step time {med['auto'] / med['no']:.3f} (target <= 1.05: "
          f"{'holds' if med['auto'] / med['no'] <= 1.05 else 'MISSED'}); forced bf16 / fp32 {med['bf16'] / med['no']:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="steps per variant (the first is a warm-up)")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8], help="default shape: batches to compare")
    p.add_argument("--batch", type=int, default=2, help="--shape 270m / embedded: sequences per step")
    p.add_argument("--repeats", type=int, default=3, help="--shape embedded: runs per precision (median)")
    p.add_argument("--shape", choices=("default", "270m", "embedded"), default="default",
                   help="default: the small shape above; 270m: the real gemma-3-270m configuration, fp32 vs bf16; "
                        "embedded: the shipped default model, --mixed-precision auto vs fp32")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # child process of --shape 270m / embedded
        print(json.dumps(run_trainer_variant(args.model or None, args.data or None, args.precision,
                                             args.cache or None, args.batch, args.steps)))
        return
    if args.variant:  # child process of the default shape
        print(json.dumps(run_variant(args.variant, args.batch, args.steps, args.cache)))
        return
    if args.shape == "270m":
        main_270m(args)
        return
    if args.shape == "embedded":
        main_embedded(args)
        return

    import torch

    print(f"# shape {SHAPE}, {SEQ} tokens per sequence, AdamW fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp) / "cache"
        build_cache(cache_dir, args.steps * max(args.batches))
        results = {}
        for batch in args.batches:
            for variant in VARIANTS:
                out = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(batch),
                                      "--steps", str(args.steps), "--cache", str(cache_dir)],
                                     capture_output=True, text=True, check=True)
                results[(batch, variant)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'batch':>5} {'variant':<9} {'step s':>8} {'peak RSS MB':>12}")
    for (batch, variant), r in results.items():
        print(f"{batch:>5} {variant:<9} {r['step_s']:>8.3f} {r['peak_rss_mb']:>12.0f}")
    print()
    for batch in args.batches:
        t = {v: results[(batch, v)]["step_s"] for v in VARIANTS}
        print(f"batch {batch} x {SEQ}: (a) qat/plain {t['qat'] / t['plain']:.3f} (target <= 1.15)   "
              f"(b) torchao/plain {t['torchao'] / t['plain']:.3f}   "
              f"(c) kd-cache/kd-live {t['kd-cache'] / t['kd-live']:.3f} (target <= 0.8)")


if __name__ == "__main__":
    main()
