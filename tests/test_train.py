"""End-to-end training on the CPU with a tiny Gemma 3: checkpoints, resume, DDP, teacher cache, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gemma3_qat.checkpoint import QATMetadata, verify_manifest
from gemma3_qat.errors import CorruptFileError
from gemma3_qat.qat.train import QATRecipe, TrainConfig, TrainingError, TrainingStopped, train


def config(tiny_text_dir, sample_data, out, **kw):
    base = dict(model=str(tiny_text_dir), data=[str(sample_data / "text.jsonl"), f"{sample_data / 'chat.jsonl'}:0.5"],
                format="int4-block", seq_len=64, batch_size=4, micro_batch_size=2, steps=6, lr=1e-3, warmup_steps=2,
                eval_every=3, eval_rows=8, save_every=3, output=str(out))
    base.update(kw)
    return TrainConfig(**base)


def cli_args(cfg: TrainConfig) -> list[str]:
    args = ["train", "--model", cfg.model, "--format", cfg.format, "--seq-len", str(cfg.seq_len),
            "--batch-size", str(cfg.batch_size), "--micro-batch-size", str(cfg.micro_batch_size),
            "--steps", str(cfg.steps), "--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup_steps),
            "--eval-every", str(cfg.eval_every), "--save-every", str(cfg.save_every), "--kd", cfg.kd,
            "--output", cfg.output]
    for d in cfg.data:
        args += ["--data", d]
    return args


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return load_file(str(path / "model.safetensors"))


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "HF_HUB_OFFLINE": "1"}


def test_output_is_a_qat_checkpoint_with_metrics(tiny_text_dir, sample_data, tmp_path):
    out = train(config(tiny_text_dir, sample_data, tmp_path / "run", quantize_embeddings=True), log=lambda *_: None)
    meta = QATMetadata.read(out / "qat.json")
    assert meta.format == "int4-block" and meta.steps == 6 and meta.quantize_embeddings
    assert len(meta.quantized_modules) == 44 and "lm_head" in meta.quantized_modules
    assert {"val_kl", "val_top1", "val_ppl", "ptq_val_kl"} <= set(meta.metrics)
    from gemma3_qat.qat.precision import choose_precision
    from gemma3_qat.sources import source_architecture

    hidden = source_architecture(str(tiny_text_dir)).hidden
    assert meta.precision == choose_precision("auto", cuda=torch.cuda.is_available(), hidden=hidden).mode  # as resolved
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "train-config.yaml"):
        assert (out / name).exists(), name
    w = weights(out)
    assert w["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # master (latent) weights, fp32
    rows = metrics(out)
    assert rows[0]["step"] == 0 and "val_kl" in rows[0]  # the PTQ baseline
    assert [r["step"] for r in rows[1:]] == list(range(1, 7))
    assert {"loss", "kd_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"} <= set(rows[1])
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000003", "step-000006"]
    assert QATMetadata.read(out / "checkpoints" / "step-000003" / "qat.json").steps == 3  # itself exportable
    # each checkpoint, and the final one, verifies itself: size and SHA-256 of every file, written last
    for d in (out, out / "checkpoints" / "step-000003"):
        assert (d / "manifest.json").exists(), d
        verify_manifest(d)
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert "model.safetensors" in listed and not any(k.startswith(("checkpoints/", "metrics")) for k in listed)
    assert "trainer/optimizer.bin" in json.loads((out / "checkpoints" / "step-000003" / "manifest.json")
                                                 .read_text())["files"]


def test_steps_zero_is_the_ptq_baseline_in_the_same_layout(tiny_text_dir, sample_data, tmp_path):
    handler = signal.getsignal(signal.SIGINT)
    out = train(config(tiny_text_dir, sample_data, tmp_path / "ptq", steps=0), log=lambda *_: None)
    assert signal.getsignal(signal.SIGINT) is handler  # the run gives SIGINT back to its caller
    assert QATMetadata.read(out / "qat.json").steps == 0
    original = load_file(str(tiny_text_dir / "model.safetensors"))
    for k, v in weights(out).items():
        assert torch.equal(v, original[k]), k


def test_interrupted_checkpoint_write_never_replaces_the_good_one(tiny_text_dir, sample_data, tmp_path, monkeypatch):
    cfg = config(tiny_text_dir, sample_data, tmp_path / "run", steps=6, save_every=3)
    recipe = QATRecipe(cfg, log=lambda *_: None)
    recipe.setup()
    calls = {"n": 0}
    real = recipe.accelerator.save_state

    def failing_save_state(path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(path)

    monkeypatch.setattr(recipe.accelerator, "save_state", failing_save_state)
    with pytest.raises(OSError, match="disk full"):
        recipe.train()
    done = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert done == ["step-000003"]
    good = tmp_path / "run" / "checkpoints" / "step-000003"
    assert (good / "trainer" / "trainer_state.json").exists() and (good / "qat.json").exists()


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_text_dir, sample_data, tmp_path):
    full = config(tiny_text_dir, sample_data, tmp_path / "full", steps=12, save_every=2, eval_every=100)
    subprocess.run([sys.executable, "-m", "gemma3_qat.cli", *cli_args(full)], env=ENV, check=True,
                   capture_output=True)
    cut = config(tiny_text_dir, sample_data, tmp_path / "cut", steps=12, save_every=2, eval_every=100)
    proc = subprocess.Popen([sys.executable, "-m", "gemma3_qat.cli", *cli_args(cut)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "cut" / "checkpoints" / "step-000004"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists()
    assert not (tmp_path / "cut" / "qat.json").exists()  # it really was cut short
    # the newest complete checkpoint is torn too (a disk that filled up, a bad copy): its optimizer state is cut
    newest = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))[-1]
    optimizer = newest / "trainer" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])
    resumed = subprocess.run([sys.executable, "-m", "gemma3_qat.cli", *cli_args(cut), "--resume"], env=ENV,
                             check=True, capture_output=True, text=True)
    assert f"skipping {newest}: trainer/optimizer.bin: 1,000 bytes" in resumed.stdout, resumed.stdout[-2000:]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        assert torch.equal(a[k], b[k]), k  # bit-identical, from the checkpoint before the torn one


@pytest.mark.slow
def test_ddp_two_processes_gives_the_same_loss_curve(tiny_text_dir, sample_data, tmp_path):
    one = config(tiny_text_dir, sample_data, tmp_path / "one", steps=4, micro_batch_size=2, eval_every=100,
                 save_every=100)
    two = config(tiny_text_dir, sample_data, tmp_path / "two", steps=4, micro_batch_size=1, eval_every=100,
                 save_every=100)
    subprocess.run([sys.executable, "-m", "gemma3_qat.cli", *cli_args(one)], env=ENV, check=True, capture_output=True)
    # accelerate 1.15's `accelerate launch --cpu --num_processes 2` starts ONE non-distributed process; torchrun
    # (what accelerate launch wraps) with ACCELERATE_USE_CPU gives two gloo processes that Accelerator sees as DDP
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "gemma3_qat.cli", *cli_args(two)]
    result = subprocess.run(launch, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("QAT checkpoint:") == 1  # one main process, not two independent runs
    l1 = [r["loss"] for r in metrics(tmp_path / "one") if "loss" in r]
    l2 = [r["loss"] for r in metrics(tmp_path / "two") if "loss" in r]
    assert len(l1) == len(l2) == 4
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    # fake quantization saw whole weights in every process: the trained weights agree too, up to the order of
    # the gradient all-reduce's float sums (measured: 1.6e-5 at most, on 0.05% of one tensor's elements, against
    # updates of 1.3e-3 on average)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_teacher_cache_gives_the_same_loss_as_the_live_teacher(tiny_text_dir, sample_data, tmp_path, mode):
    from gemma3_qat.qat.teacher_cache import build_from_config

    live = config(tiny_text_dir, sample_data, tmp_path / "live", kd=mode, kd_k=16, steps=3, eval_every=100,
                  save_every=100)
    build_from_config(live, tmp_path / "cache", log=lambda *_: None)
    meta = json.loads((tmp_path / "cache" / "teacher-cache.json").read_text())
    assert meta["k"] == 16 and 16 * 8 <= meta["bytes_per_token"] < 16 * 8 + 40
    train(live, log=lambda *_: None)
    cached = config(tiny_text_dir, sample_data, tmp_path / "cached", kd=mode, kd_k=16, steps=3, eval_every=100,
                    save_every=100, teacher_cache=str(tmp_path / "cache"))
    train(cached, log=lambda *_: None)
    a = [r["loss"] for r in metrics(tmp_path / "live") if "loss" in r]
    b = [r["loss"] for r in metrics(tmp_path / "cached") if "loss" in r]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=1e-7)
    # validation: the same keys whatever the teacher source; the same targets give the same KD loss and top-1
    live_val, cached_val = metrics(tmp_path / "live")[0], metrics(tmp_path / "cached")[0]
    assert live_val.keys() == cached_val.keys() >= {"val_kl", "val_kd_loss", "val_top1", "val_ppl"}
    assert cached_val["val_kl"] is None and live_val["val_kl"] > 0  # a cache holds no full distribution
    for key in ("val_kd_loss", "val_top1", "val_ppl"):
        assert cached_val[key] == pytest.approx(live_val[key], rel=1e-5), key
    # the same cache serves another format; another KD setting is refused with the fix
    train(config(tiny_text_dir, sample_data, tmp_path / "sfp8", format="sfp8", kd=mode, kd_k=16, steps=1,
                 teacher_cache=str(tmp_path / "cache")), log=lambda *_: None)
    with pytest.raises(ValueError, match="rebuild it with the same"):
        train(config(tiny_text_dir, sample_data, tmp_path / "other", kd=mode, kd_k=8, steps=1,
                     teacher_cache=str(tmp_path / "cache")), log=lambda *_: None)


def test_bad_input_is_refused_before_anything_is_written(tiny_text_dir, sample_data, tmp_path, tokenizer_dir):
    quiet = dict(log=lambda *_: None)
    with pytest.raises(ValueError, match="unknown format 'int2'"):
        config(tiny_text_dir, sample_data, tmp_path / "a", format="int2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(config(tiny_text_dir, sample_data, tmp_path / "b", model=str(tmp_path / "nope")), **quiet)
    assert not (tmp_path / "b").exists()  # nothing written for a run that could not start
    with pytest.raises(FileNotFoundError, match="offline"):
        train(config(tiny_text_dir, sample_data, tmp_path / "c", model="google/gemma-3-1b-pt"), **quiet)
    with pytest.raises(ValueError, match="beyond the model's context of 512"):
        train(config(tiny_text_dir, sample_data, tmp_path / "d", seq_len=1024), **quiet)
    with pytest.raises(ValueError, match="no 'text' or 'messages' field; fields found: q"):
        (tmp_path / "bad.jsonl").write_text('{"q": 1}\n')
        train(config(tiny_text_dir, sample_data, tmp_path / "e", data=[str(tmp_path / "bad.jsonl")]), **quiet)
    out = tmp_path / "run"
    train(config(tiny_text_dir, sample_data, out, steps=1), **quiet)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume .* or --force"):
        train(config(tiny_text_dir, sample_data, out, steps=1), **quiet)
    assert (out / "model.safetensors").read_bytes() == before


def test_nan_loss_stops_and_names_the_step_and_checkpoint(tiny_text_dir, sample_data, tmp_path):
    cfg = config(tiny_text_dir, sample_data, tmp_path / "nan", steps=6, save_every=1, lr=1e30, warmup_steps=1,
                 max_grad_norm=1e30)
    with pytest.raises(TrainingError, match=r"diverged at step \d+ \(.*\); the last good checkpoint is .*step-"):
        train(cfg, log=lambda *_: None)


def test_cli_errors_are_one_line(tiny_text_dir, tmp_path):
    from typer.testing import CliRunner

    from gemma3_qat.cli import app

    result = subprocess.run([sys.executable, "-m", "gemma3_qat.cli", "train", "--format", "int2", "--model",
                             str(tiny_text_dir)], env=ENV, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: unknown format 'int2'; choose one of: int4-block, "
                                                  "int4-channel, sfp8, q4_k, q6_k, q5_0, q8_0-lattice, q4_k_m"]
    assert "Traceback" not in result.stderr
    assert CliRunner().invoke(app, ["train", "--help"]).exit_code == 0


def test_resume_skips_damaged_checkpoints_and_ends_bit_identical(tiny_text_dir, sample_data, tmp_path):
    """--resume falls back to the newest checkpoint that verifies, naming each one it skipped and why."""
    cfg = config(tiny_text_dir, sample_data, tmp_path / "run", steps=4, save_every=1, keep_checkpoints=4,
                 eval_every=100)
    out = train(cfg, log=lambda *_: None)
    uninterrupted = weights(out)
    ckpts = out / "checkpoints"
    model = ckpts / "step-000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])  # torn weights
    optimizer = ckpts / "step-000003" / "trainer" / "optimizer.bin"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit: same size, other bytes
    optimizer.write_bytes(bytes(data))
    (ckpts / "step-000002" / "manifest.json").unlink()  # as a checkpoint from before manifests
    (ckpts / "step-000002" / "trainer" / "trainer_state.json").write_text('{step: 2')  # corrupt trainer state
    lines = []
    train(config(tiny_text_dir, sample_data, tmp_path / "run", steps=4, save_every=1, keep_checkpoints=4,
                 eval_every=100), resume=True, log=lines.append)
    skipped = [line for line in lines if line.startswith("--resume: skipping")]
    assert len(skipped) == 3, lines
    assert "step-000004" in skipped[0] and "model.safetensors" in skipped[0] and "manifest says" in skipped[0]
    assert "step-000003" in skipped[1] and "optimizer.bin" in skipped[1] and "SHA-256" in skipped[1]
    assert "step-000002" in skipped[2] and "trainer_state.json is unreadable" in skipped[2]
    assert any("resumed from" in line and "step-000001" in line for line in lines), lines
    resumed = weights(out)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3, 4]  # the rows after step 1 were written once more
    assert "ptq_val_kl" in QATMetadata.read(out / "qat.json").metrics  # the PTQ baseline survives the resume
    # nothing verifies: refused with the list, in one line
    for d in ckpts.glob("step-*"):
        (d / "trainer" / "trainer_state.json").unlink()
    with pytest.raises(CorruptFileError, match=r"no checkpoint verifies \(step-000004: .*step-000001: no trainer/"):
        train(config(tiny_text_dir, sample_data, tmp_path / "run", steps=4, save_every=1), resume=True,
              log=lambda *_: None)


def test_clean_stop_saves_a_checkpoint_and_raises_training_stopped(tiny_text_dir, sample_data, tmp_path):
    recipe = QATRecipe(config(tiny_text_dir, sample_data, tmp_path / "run", steps=6, save_every=100),
                       log=lambda *_: None)
    recipe.setup()
    recipe.stop_requested = True  # what SIGINT/SIGTERM set
    with pytest.raises(TrainingStopped, match="stopped at step 1 .*--resume --output") as info:
        recipe.train()
    assert not isinstance(info.value, KeyboardInterrupt) and info.value.exit_code == 130
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "manifest.json").exists()


def test_every_knob_is_declared_once_and_is_a_flag():
    """Each TrainConfig field is a recipe key and a `train` flag whose help comes from the field itself; the flags a
    user relies on keep their names."""
    import inspect
    from dataclasses import fields

    from typer.testing import CliRunner

    from gemma3_qat.cli import app
    from gemma3_qat.cli import train as train_command
    from gemma3_qat.qat.config import knobs

    params = inspect.signature(train_command).parameters
    assert {f.name for f in fields(TrainConfig)} <= set(params)
    assert all(k.help for k in knobs())
    flags = {k.name: k.flags for k in knobs()}
    assert flags["format"] == ("--format", "-f") and flags["seq_len"] == ("--seq-len",)
    assert flags["assistant_only"] == ("--assistant-only/--all-tokens",) and flags["kd_k"] == ("--kd-k",)
    assert flags["ptq_init"] == ("--ptq-init",)  # a knob that was recipe-only is a flag now
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "Packed sequence length in tokens." in out and "--quantize-embeddings" in out


def test_recipe_choice_follows_the_model_size(tmp_path):
    """No --recipe: the released size's recipe for the format; any other model, or none, default.yaml; never the
    dataclass defaults. Names of shipped recipes resolve without a path."""
    from gemma3_qat import models
    from builders import tiny_text_config
    from gemma3_qat.errors import MissingFileError
    from gemma3_qat.qat.recipes import DEFAULT_RECIPE, RECIPES, resolve_recipe

    assert resolve_recipe(None, None).path == DEFAULT_RECIPE and DEFAULT_RECIPE.exists()
    real = tmp_path / "270m-finetune"
    real.mkdir()
    models.hf_config(models.GEMMA3_SHAPES["270m"]).to_json_file(real / "config.json")
    assert resolve_recipe(None, str(real)).path == RECIPES / "gemma3-270m-int4-block.yaml"
    choice = resolve_recipe(None, str(real), "sfp8")
    assert choice.path == RECIPES / "gemma3-270m-sfp8.yaml" and "270m shape" in choice.why
    config = TrainConfig.from_recipe(choice, model=str(real), format="sfp8")
    assert (config.steps, config.seq_len, config.kd) == (5000, 2048, "sampled")  # the 270m recipe's, not defaults
    small = tmp_path / "small"
    small.mkdir()
    tiny_text_config(512, hidden=64, ffn=128, layers=2, heads=2, kv_heads=1, head_dim=32).to_json_file(
        small / "config.json")
    choice = resolve_recipe(None, str(small))
    assert choice.path == DEFAULT_RECIPE and "not one of the released sizes" in choice.why
    assert TrainConfig.from_recipe(choice, model=str(small)).steps == 400
    assert resolve_recipe("gemma3-1b-int4-block", None).path == RECIPES / "gemma3-1b-int4-block.yaml"
    assert resolve_recipe("recipes/gemma3-1b-sfp8.yaml", None).path.exists()
    with pytest.raises(MissingFileError, match="shipped recipes: .*gemma3-27b-sfp8"):
        resolve_recipe("gemma3-2b-int4-block", None)


def test_peak_memory_is_this_process_high_water_mark_not_the_parent_s(tmp_path):
    """ru_maxrss survives exec: a process that peaked at 1.5 GB and then exec'd the trainer would log 1.5 GB."""
    script = tmp_path / "child.py"
    script.write_text(
        "import os, sys\n"
        "if len(sys.argv) == 1:\n"
        "    block = b'x' * (1536 << 20)\n"
        "    del block\n"
        "    os.execv(sys.executable, [sys.executable, __file__, 'child'])\n"
        "import torch\n"
        "from gemma3_qat.qat.train import _peak_memory_mb\n"
        "print(_peak_memory_mb(torch.device('cpu')))\n")
    result = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, check=True)
    peak = float(result.stdout.strip().splitlines()[-1])
    assert 10 < peak < 1200, peak  # the child's own peak (imports: a few hundred MB), not the 1.5 GB before exec


def test_lr_multipliers_of_zero_freeze_the_vectors_and_the_embedding(tiny_text_dir, sample_data, tmp_path):
    """vector_lr_mult / embedding_lr_mult scale those groups' lr (recipe_sweep measures them): 0 leaves them at the
    teacher's values while the quantized matrices still learn."""
    teacher = weights(tiny_text_dir)
    out = train(config(tiny_text_dir, sample_data, tmp_path / "run", steps=3, vector_lr_mult=0.0,
                       embedding_lr_mult=0.0), log=lambda *_: None)
    student = weights(out)
    embed, norm, matrix = ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                           "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(student[embed], teacher[embed].float())
    assert torch.equal(student[norm], teacher[norm].float())
    assert not torch.equal(student[matrix], teacher[matrix].float())
    with pytest.raises(Exception, match="vector_lr_mult must be >= 0"):
        config(tiny_text_dir, sample_data, tmp_path / "bad", vector_lr_mult=-1.0)


def test_auto_precision_follows_the_cpu_and_the_width(monkeypatch):
    """`--mixed-precision auto`: bf16 on CUDA; on a CPU, bf16 only where it computes bf16 matmuls natively and the
    model is wide enough; `no` and `bf16` force. A CPU without native bf16 keeps fp32 (the capability check's
    answer forced)."""
    from gemma3_qat.qat import precision as config

    choose = config.choose_precision
    assert choose("auto", cuda=True, hidden=64).mode == "bf16"
    assert choose("auto", cuda=False, hidden=640, cpu_bf16="AVX512-BF16").mode == "bf16"
    narrow = choose("auto", cuda=False, hidden=64, cpu_bf16="AVX512-BF16")
    assert narrow.mode == "no" and "hidden size 64" in narrow.why
    none = choose("auto", cuda=False, hidden=640, cpu_bf16=None)
    assert none.mode == "no" and "no native bf16" in none.why
    assert choose("bf16", cuda=False, hidden=64, cpu_bf16=None).mode == "bf16"
    assert choose("no", cuda=True).mode == "no"
    monkeypatch.setattr(config, "cpu_bf16_support", lambda: None)
    assert choose("auto", cuda=False, hidden=640).mode == "no"
    assert config.Precision("bf16", "").teacher_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="auto, no or bf16"):
        choose("fp16", cuda=False)


def test_fake_quant_values_follow_each_optimizer_step(tiny_text_dir, sample_data, tmp_path):
    """The trainer's fused AdamW (CPU) updates the weights in place without bumping their version counter: the
    cached fake-quant values must still be those of the updated weights at the next step (they were stale
    before the trainer invalidated them)."""
    recipe = QATRecipe(config(tiny_text_dir, sample_data, tmp_path / "run", steps=2), log=lambda *_: None)
    recipe.setup()
    try:
        for _ in range(2):
            recipe.train_step()
            for q in recipe.fake_quantizers:
                weight = next(m.weight for m in recipe.student.modules() if getattr(m, "weight_fake_quant", None) is q)
                assert torch.equal(q.quantized_values(weight), q.format.fake_quantize_values(weight.detach()))
    finally:
        recipe.restore_signal_handlers()
