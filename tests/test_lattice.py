"""Lattice recovery from bf16 QAT checkpoints (issue 16): exact against brute force, on checkpoints made the way
Google's look (an int4-block QAT run's fake-quantized weights cast to bf16, saved as a plain HF checkpoint)."""

from __future__ import annotations

import shutil

import pytest
import torch

from gemma3_qat.errors import InputError
from gemma3_qat.formats import Int4Block, Int4Channel, q4_0_blocks
from gemma3_qat.lattice import lattice_fractions, looks_like, recover_groups, recover_tensor, recovering_format

BLOCK = Int4Block()
CHANNEL = Int4Channel()


def _bf16_qat(weight: torch.Tensor, fmt=BLOCK) -> tuple[torch.Tensor, object]:
    """What a Google-style checkpoint stores for ``weight``: its fake-quantized values in bf16; and the codes."""
    qw = fmt.quantize(weight)
    return fmt.dequantize(qw).to(torch.bfloat16), qw


def _brute_force(stored: torch.Tensor, window: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of 32: how many fp16 scales ``D`` (extreme at code -8) give ``bf16(k * D) == v`` for every
    element with ``k = clamp(round(v / D), -8, 7)``, and the smallest and largest such ``|D|``; by trying every
    fp16 value within ``window`` steps of ``|m| / 8`` (the bf16 interval spans at most 5 a side)."""
    v = stored.to(torch.float32).reshape(-1, 32)
    hi, lo = v.amax(1), v.amin(1)
    sign_e = torch.where(hi >= -lo, 1.0, -1.0)
    ea = torch.maximum(hi, -lo)
    centre = (ea / 8).to(torch.float16).view(torch.int16).to(torch.int32)
    cand = (centre.unsqueeze(1) + torch.arange(-window, window + 1)).clamp(1, 0x7BFF)
    d = cand.to(torch.int16).view(torch.float16).to(torch.float32) * (-sign_e).unsqueeze(1)  # [B, C] signed
    k = (v.unsqueeze(1) / d.unsqueeze(2)).round().clamp(-8, 7)  # [B, C, 32]
    ok = ((k * d.unsqueeze(2)).to(torch.bfloat16) == stored.reshape(-1, 1, 32)).all(2)
    ok &= torch.cat([torch.ones_like(cand[:, :1], dtype=torch.bool), cand[:, 1:] != cand[:, :-1]], 1)  # clamped
    dd = d.abs()
    return (ok.sum(1), torch.where(ok, dd, torch.inf).amin(1), torch.where(ok, dd, 0.0).amax(1))


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(64, 1024, generator=g) * 0.02
    heavy = torch.distributions.StudentT(2.0).sample((64, 1024)) * 0.01
    return {"gaussian": gauss, "heavy-tailed": heavy, "tiny (fp16-subnormal scales)": gauss * 1e-4,
            "large": gauss * 3e4, "bf16 latent": gauss.to(torch.bfloat16).float()}


@pytest.mark.parametrize("case", list(_cases()))
def test_recovery_equals_brute_force(case):
    """Every consistent scale and only those, with exact ties (round half to even) included: the count and both
    ends of the run agree with trying each fp16 candidate by the forward rule; the chosen one reproduces every
    stored value; perturbing a value by one bf16 step is seen."""
    stored, _ = _bf16_qat(_cases()[case])
    r = recover_groups(stored.reshape(-1, 32))
    n, smallest, largest = _brute_force(stored)
    assert torch.equal(r.n_scales, n)
    on = n > 0
    assert on.float().mean() == 1.0 or case.startswith("tiny")  # fp16-subnormal scales can underflow to zero blocks
    chosen = r.scales.to(torch.float32).abs()
    assert torch.all((chosen[on] >= smallest[on]) & (chosen[on] <= largest[on]))
    assert torch.equal(r.spread[on], (largest - smallest)[on])
    values = BLOCK.dequantize(recover_tensor(stored).quantized).to(torch.bfloat16)
    assert torch.equal(values.float(), stored.float())  # -0.0 == 0.0: the only difference a value can have

    bumped = stored.clone().reshape(-1, 32)
    bumped[::3, 5] = (bumped[::3, 5].view(torch.int16) + 1).view(torch.bfloat16)  # one bf16 step further out
    n2 = recover_groups(bumped).n_scales
    assert torch.equal(n2, _brute_force(bumped)[0])
    assert (n2[::3] == 0).float().mean() > 0.3  # most bumped blocks leave the lattice, the rest stay exact


def test_edge_blocks_zero_underflow_ties_nan():
    """Q4_0's zero convention (D = 0, codes 8) for an all-zero block, one of -0.0s and one whose scale underflowed
    fp16; +a and -a as extremes, a NaN, and a nonzero value too small for any code are off the lattice."""
    base = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)) * 0.02
    base[0] = 0.0
    base[1] = -0.0
    base[2] = base[2] * 1e-9  # d < 2**-25: fp16(d) = 0, every stored value is 0
    stored, _ = _bf16_qat(base)
    stored[3, 0], stored[3, 1] = 0.5, -0.5  # +a and -a: no code -8 at both
    stored[4, 7] = float("nan")
    stored[5, 9] = 1e-30  # nonzero, far below D / 2: code 0 cannot give it
    r = recover_groups(stored)
    assert r.on_lattice.tolist() == [True, True, True, False, False, False, True, True]
    assert torch.all(r.codes[:3] == 8) and torch.all(r.scales[:3] == 0)
    assert torch.all(r.error[3:6] > 0)
    qw = recover_tensor(stored).quantized
    assert torch.equal(BLOCK.quantize(BLOCK.dequantize(qw)).codes[:3], qw.codes[:3])  # zero blocks: fixed points


def test_q4_0_bytes_and_fixed_point():
    """The recovered weight writes Q4_0 bytes whose values are the stored ones; re-quantizing its fp32 values
    with int4-block's rule gives the same codes and scales bit for bit (the latent-checkpoint route is exact);
    byte-identity with the original run's codes, per tie rule, is printed (bf16 cannot tell ~60% of scales)."""
    w = torch.randn(512, 2048, generator=torch.Generator().manual_seed(2)) * 0.02
    stored, original = _bf16_qat(w)
    lattice = recover_tensor(stored, name="w")
    qw = lattice.quantized
    assert lattice.fraction == 1.0 and lattice.extreme_codes == {-8: lattice.groups} and lattice.not_fixed == 0
    again = BLOCK.quantize(BLOCK.dequantize(qw))
    assert torch.equal(again.codes, qw.codes) and torch.equal(again.scales.view(torch.int16),
                                                               qw.scales.view(torch.int16))
    blocks = torch.from_numpy(q4_0_blocks(qw)).reshape(-1, 18)
    ref = torch.from_numpy(q4_0_blocks(original)).reshape(-1, 18)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = torch.from_numpy(dequantize(q4_0_blocks(qw), GGMLQuantizationType.Q4_0)).reshape(w.shape)
    assert torch.equal(values.to(torch.bfloat16), stored)
    print(f"\n{lattice.line()}; scales per block {lattice.scale_counts}")
    print(f"byte-identical Q4_0 blocks (rule q4_0): {(blocks == ref).all(1).float().mean():.1%}")
    for rule in ("middle", "smallest", "largest"):
        other = recover_tensor(stored, rule=rule).quantized
        same = (other.scales == original.scales).float().mean()
        print(f"byte-identical scales (rule {rule}): {same:.1%}")
    # what the choice can change: below bf16's resolution, ~1e-5 of the weights' mean square
    print(f"smallest vs largest scale: mean squared difference {lattice.spread_msd:.3g} "
          f"({lattice.spread_msd / lattice.weight_ms:.2e} of the mean squared weight)")
    assert lattice.spread_msd / lattice.weight_ms < 1e-4


def test_channel_group_and_other_grids_are_told_apart():
    """int4-channel weights are on a per-row lattice and not on blocks of 32; a group-64 grid looks like group
    64; a torchao-style grid (d = max / 7.5, its positive extremes at +7) is recovered with its +7 extremes, which
    Q4_0's rule cannot produce (not fixed points)."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3)) * 0.02
    channel, _ = _bf16_qat(w, CHANNEL)
    lattice = recover_tensor(channel, "int4-channel")
    assert lattice.fraction == 1.0
    assert torch.equal(CHANNEL.dequantize(lattice.quantized).to(torch.bfloat16), channel)
    assert looks_like(lattice_fractions(channel))[0] == "int4-channel"
    blocks32 = recover_tensor(channel)  # only the blocks that hold a row's code -8 or +-7 are on a lattice
    assert blocks32.fraction < 0.5 and looks_like(lattice_fractions(channel))[1] == 1.0

    g64, _ = _bf16_qat(w.reshape(-1, 64), CHANNEL)  # Q4_0's rule over groups of 64
    assert looks_like(lattice_fractions(g64.reshape(w.shape)))[0] == "int4 group 64"

    blocks = w.reshape(-1, 32)
    d = (blocks.abs().amax(1, keepdim=True) / 7.5).to(torch.float16).float()
    torchao = ((blocks / d).round().clamp(-8, 7) * d).to(torch.bfloat16).reshape(w.shape)
    t = recover_tensor(torchao)
    assert t.fraction > 0.999 and t.not_fixed > 0 and set(t.extreme_codes) <= {-8, 7}
    assert torch.equal(BLOCK.dequantize(t.quantized).to(torch.bfloat16), torchao)
    print(f"\ntorchao-style grid: {t.line()}; extremes {t.extreme_codes}")


@pytest.mark.parametrize("shape", [(1024, 640), (256, 640), (640, 1024), (2048, 640), (640, 2048)])
def test_gemma3_270m_layer_shapes(shape):
    """One decoder layer of Gemma 3 270M (hidden 640, 4 heads x 256, 1 KV head, ffn 2048), Gaussian weights at
    its init scale: every block recovered, every stored value reproduced, fixed points of Q4_0."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * shape[1] ** -0.5
    stored, _ = _bf16_qat(w)
    lattice = recover_tensor(stored)
    assert lattice.fraction == 1.0 and lattice.not_fixed == 0
    values = BLOCK.dequantize(lattice.quantized)
    assert torch.equal(values.to(torch.bfloat16), stored)
    assert torch.equal(BLOCK.quantize(values).codes, lattice.quantized.codes)


def test_stored_dtypes_and_ordinary_weights():
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4)) * 0.02
    qw = BLOCK.quantize(w)
    values = BLOCK.dequantize(qw)
    exact = recover_tensor(values)  # fp32 storage: the lattice point itself, byte-identical
    assert exact.fraction == 1.0 and torch.equal(exact.quantized.codes, qw.codes)
    assert torch.equal(exact.quantized.scales, qw.scales) and exact.ambiguous == 0
    half = recover_tensor(values.to(torch.float16))
    assert half.fraction == 1.0
    assert torch.equal(BLOCK.dequantize(half.quantized).to(torch.float16), values.to(torch.float16))
    ordinary = recover_tensor(w.to(torch.bfloat16))
    assert ordinary.fraction < 0.01 and ordinary.worst_error > 0.25
    # a chunk of rows of fp32 copies of bf16 values, as an exporter hands them over
    fmt = recovering_format("int4-block")
    stored = values.to(torch.bfloat16)
    assert torch.equal(fmt.quantize(stored.float()[:8]).codes, recover_tensor(stored).quantized.codes[:8])
    encoding = fmt.gguf_encoding()  # what the GGUF planner asks a format for: Q4_0 bytes of the recovered codes
    assert encoding.ggml_type.name == "Q4_0"
    assert (encoding.encode(stored.float()[8:16]) == q4_0_blocks(recover_tensor(stored[8:16]).quantized)).all()


# ------------------------------------------------------------------------------------------------- checkpoints


def _google_style(qat_dir, out):
    """A plain HF checkpoint of a QAT checkpoint's fake-quantized values in bf16 (no qat.json), as Google ships."""
    from gemma3_qat.exporters.safetensors import export_safetensors

    export_safetensors(qat_dir, out, layout="unquantized", dtype="bf16", log=None)
    for name in ("qat.json", "manifest.json"):
        (out / name).unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def trained_run(qat_run):
    """A 2-step int4-block QAT run of the embedded default model, embedding quantized: fp32 latent weights."""
    from gemma3_qat.assets import default_model_path

    return qat_run(default_model_path(), "int4-block", True, steps=2)


@pytest.mark.slow
def test_checkpoint_recovery_and_exact_export(trained_run, tmp_path):
    """The acceptance on the embedded model: >= 99.9% of blocks reproduce every stored bf16 value; the recovered
    QAT checkpoint exports a GGUF whose Q4_0 values are the stored ones; step 0 of it is the recovered lattice."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from gemma3_qat.checkpoint import Checkpoint, QATMetadata
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.recover import recover_checkpoint, write_recovered_checkpoint

    google = _google_style(trained_run, tmp_path / "google")
    result = recover_checkpoint(google, keep=True)
    assert result.fraction >= 0.999 and result.quantize_embeddings and not result.off_lattice
    run = Checkpoint(trained_run)
    identical = sum(int((BLOCK.quantize(run.read(n)).scales == t.quantized.scales).sum())
                    for n, t in result.tensors.items())
    print("\n" + result.lines()[0] + f"; byte-identical to the run's codes and scales: {identical:,} "
          f"({identical / result.groups:.1%})")

    recovered = tmp_path / "recovered"
    write_recovered_checkpoint(google, recovered, log=None)
    meta = QATMetadata.read(recovered / "qat.json")
    assert meta.format == "int4-block" and meta.quantize_embeddings and meta.teacher == str(google)
    export_gguf(recovered, tmp_path / "recovered.gguf", log=None)
    stored = Checkpoint(google)
    from gemma3_qat.layout import text_gguf_name

    names = {text_gguf_name(n): n for n in stored.names()}
    q4 = 0
    for t in GGUFReader(tmp_path / "recovered.gguf").tensors:
        if t.tensor_type.name != "Q4_0":
            continue
        q4 += 1
        want = result.tensors[names[t.name]].quantized
        assert bytes(t.data) == q4_0_blocks(want).tobytes()  # the recovered codes, through the latent route
        values = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(want.shape)
        assert torch.equal(values.to(torch.bfloat16), stored.read(names[t.name]))
    assert q4 == len(result.tensors)


@pytest.mark.slow
def test_refusals_name_the_fraction_and_the_look_alike(tmp_path):
    """An ordinary checkpoint: one line naming the fraction, nothing written; an int4-channel QAT checkpoint
    asked for int4-block: says it looks like int4-channel; asked for int4-channel, it recovers."""
    from gemma3_qat.assets import default_model_path
    from gemma3_qat.checkpoint import QATMetadata
    from gemma3_qat.recover import LatticeError, recover_checkpoint, write_recovered_checkpoint

    with pytest.raises(LatticeError, match=r"only 0\.\d\d% of the blocks of .* not a QAT checkpoint") as e:
        write_recovered_checkpoint(default_model_path(), tmp_path / "out", log=None)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []

    qat = tmp_path / "channel-qat"
    shutil.copytree(default_model_path(), qat, ignore=shutil.ignore_patterns("data"))
    (qat / "qat.json").write_text(QATMetadata(format="int4-channel").to_json())
    google = _google_style(qat, tmp_path / "google")
    with pytest.raises(LatticeError, match="looks like int4-channel .* --format int4-channel"):
        recover_checkpoint(google)
    result = recover_checkpoint(google, "int4-channel")
    assert result.fraction == 1.0 and result.off_lattice == ["model.embed_tokens.weight"]


@pytest.mark.slow
def test_tie_rule_cost_on_the_embedded_model(trained_run, tmp_path):
    """What the tie rule can change, measured: KL between the models of the smallest and the largest consistent
    scales (PyTorch, the embedded validation windows) is far below the quantization's own KL."""
    from gemma3_qat.evaluate import evaluation_windows, pytorch_logits
    from gemma3_qat.recover import write_recovered_checkpoint
    from gemma3_qat.tokenizer import load_tokenizer

    google = _google_style(trained_run, tmp_path / "google")
    dirs = {}
    for rule in ("smallest", "largest"):
        dirs[rule] = tmp_path / rule
        write_recovered_checkpoint(google, dirs[rule], rule=rule, log=None)
    windows, _, _ = evaluation_windows(load_tokenizer(str(google)), seq_len=128, max_windows=8)
    kl = []
    # lists, not zipped generators: pytorch_logits yields inside torch.no_grad(), and a generator left suspended
    # there keeps grad mode off in this thread (the training test after this one would fail)
    smallest, largest = (list(pytorch_logits(dirs[rule], windows)) for rule in ("smallest", "largest"))
    for a, b in zip(smallest, largest):
        p, q = a.log_softmax(-1), b.log_softmax(-1)
        kl.append((p.exp() * (p - q)).sum(-1))
    kl = torch.cat(kl)
    print(f"\ntie rule cost: KL(smallest || largest scales) mean {kl.mean():.3g}, max {kl.max():.3g}")
    assert kl.mean() < 1e-4


@pytest.mark.slow
def test_training_continues_exactly_at_the_recovered_lattice(trained_run, qat_run, tmp_path):
    """``train --model RECOVERED`` (the teacher defaults to it): the student's step-0 fake quantization is the
    recovered lattice itself (fixed point), so the step-0 validation KL to the recovered model is exactly 0;
    after 2 steps the run is an ordinary QAT checkpoint."""
    import json

    from gemma3_qat.checkpoint import Checkpoint
    from gemma3_qat.recover import write_recovered_checkpoint

    google = _google_style(trained_run, tmp_path / "google")
    recovered = tmp_path / "recovered"
    write_recovered_checkpoint(google, recovered, log=None)
    ckpt = Checkpoint(recovered)
    for name in ckpt.names():
        if name.endswith("proj.weight") or name.endswith("embed_tokens.weight"):
            latent = ckpt.read(name)
            assert torch.equal(BLOCK.fake_quantize_values(latent), latent), name
    run = qat_run(recovered, "int4-block", True, steps=2)
    metrics = json.loads((run / "qat.json").read_text())["metrics"]
    assert metrics["ptq_val_kl"] == 0.0


@pytest.mark.slow
def test_cli_import_then_export_and_refusal(trained_run, tmp_path):
    """`gemma3-qat import` writes the QAT checkpoint the library writes; `export --to gguf` of it gives the run's
    Q4_0 values back as the stored bf16 values; an ordinary checkpoint is refused in one line, nothing written."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from typer.testing import CliRunner

    from gemma3_qat.assets import default_model_path
    from gemma3_qat.checkpoint import Checkpoint, QATMetadata
    from gemma3_qat.cli import app
    from gemma3_qat.layout import text_gguf_name

    runner = CliRunner()
    google = _google_style(trained_run, tmp_path / "google")
    result = runner.invoke(app, ["import", str(google), "-o", str(tmp_path / "imported")])
    assert result.exit_code == 0, result.output
    assert "on the int4-block lattice (100.000%)" in result.output
    assert QATMetadata.read(tmp_path / "imported" / "qat.json").format == "int4-block"
    result = runner.invoke(app, ["export", "--to", "gguf", str(tmp_path / "imported"), "-o", str(tmp_path / "r.gguf")])
    assert result.exit_code == 0, result.output
    stored = Checkpoint(google)
    names = {text_gguf_name(n): n for n in stored.names()}
    q4 = [t for t in GGUFReader(tmp_path / "r.gguf").tensors if t.tensor_type.name == "Q4_0"]
    assert q4
    for t in q4:
        values = torch.from_numpy(dequantize(t.data, t.tensor_type)).reshape(stored.shape(names[t.name]))
        assert torch.equal(values.to(torch.bfloat16), stored.read(names[t.name]))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = runner.invoke(app, ["import", str(default_model_path()), "-o", str(tmp_path / "plain")])
    assert result.exit_code != 0 and isinstance(result.exception, InputError)
    assert "lie on an int4-block lattice" in str(result.exception) and "\n" not in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
