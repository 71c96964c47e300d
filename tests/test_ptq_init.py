"""QAT started at the imatrix-weighted scale search (``qat.ptq_init``), kept on Q4_0's runtime rule."""

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("fmt", ["int4-block", "int4-channel"])
def test_latent_for_scales_makes_the_runtime_rule_derive_those_scales(fmt):
    """The moved latents quantize, by our rule and by the gguf package's Q4_0 quantizer (llama.cpp's reference
    rule), to exactly the asked scales, with round-to-nearest codes under them."""
    from gguf import GGMLQuantizationType, quants

    from gemma3_qat.formats import get_format

    torch.manual_seed(0)
    f = get_format(fmt)
    w = torch.randn(16, 64) * torch.rand(16, 1)
    groups = f.groups_of(w)
    m = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    factor = torch.empty_like(m).uniform_(7.1, 8.9)  # the search's range: smaller and larger scales than the rule's
    D = (m / -factor).to(torch.float16)
    D[0, 0] = 0  # 0 keeps a group as it is
    latent = f.latent_for_scales(w, D)
    kept = D == 0
    assert torch.equal(f.groups_of(latent)[kept], groups[kept])
    qw = f.quantize(latent)
    expected = torch.where(kept, f.quantize(w).scales.reshape(D.shape), D)
    assert torch.equal(qw.scales.reshape(D.shape), expected)
    # round to nearest under D (ties never occur on random data), clamped to [-8, 7], but the extreme: -8 D
    values = f.dequantize(qw).reshape(groups.shape)
    Df = D.float().unsqueeze(-1)
    rtn = torch.round(groups / torch.where(Df == 0, 1.0, Df)).clamp(-8, 7) * Df
    first = groups.abs().argmax(dim=-1, keepdim=True)
    rtn.scatter_(-1, first, -8 * Df)
    assert torch.equal(values[~kept], rtn[~kept])
    pushed = (torch.round(groups.gather(-1, first) / Df) > -8).squeeze(-1) & ~kept  # larger scales: extreme at -7
    assert 0 < int(pushed.sum()) < int((~kept).sum())
    if fmt == "int4-block":  # llama.cpp's own rule on the latents gives the same blocks
        ours = f.gguf_encode(latent, GGMLQuantizationType.Q4_0)
        theirs = quants.quantize(latent.numpy(), GGMLQuantizationType.Q4_0)
        assert np.array_equal(np.asarray(ours).view(np.uint8).ravel(), theirs.view(np.uint8).ravel())


def test_search_lowers_the_weighted_error_and_never_raises_it():
    from gemma3_qat.formats import get_format
    from gemma3_qat.qat.ptq_init import SearchReport, search_tensor

    torch.manual_seed(1)
    f = get_format("int4-block")
    w = torch.randn(64, 256) * 0.02
    importance = torch.rand(256) ** 4  # a few columns dominate, as activations do
    report = SearchReport()
    latent = search_tensor(f, w, importance, report)
    assert 0 < report.changed < report.groups
    assert report.error_searched < 0.97 * report.error_rule
    # per group: the realised error under the search is never above the rule's
    weights = (importance * torch.sqrt(w.pow(2).mean(dim=1, keepdim=True) + w.pow(2))).reshape(64, 8, 32)
    err = lambda v: (weights * (w.reshape(64, 8, 32) - v.reshape(64, 8, 32)) ** 2).sum(-1)  # noqa: E731
    assert bool((err(f.fake_quantize_values(latent)) <= err(f.fake_quantize_values(w))).all())


def test_imatrix_init_starts_qat_below_round_to_nearest(tmp_path):
    """On the embedded (trained) model and data, step 0 of a run with ptq_init: imatrix has a lower validation
    KL than the runtime rule's."""
    import json

    from gemma3_qat.qat.train import TrainConfig, train

    kl = {}
    for init in ("rtn", "imatrix"):
        config = TrainConfig(format="int4-block", seq_len=128, batch_size=2, micro_batch_size=2, steps=0, eval_rows=16,
                             ptq_init=init, mixed_precision="no", output=str(tmp_path / init))
        run = train(config, log=lambda *_: None)
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
        kl[init] = next(r["val_kl"] for r in rows if "val_kl" in r)
    assert kl["imatrix"] < kl["rtn"]


def test_ptq_init_names_the_choices_and_the_formats_it_applies_to():
    from gemma3_qat.errors import InputError
    from gemma3_qat.qat.train import TrainConfig

    with pytest.raises(InputError, match="rtn, imatrix"):
        TrainConfig(ptq_init="gptq")
    with pytest.raises(InputError, match="sfp8 has none"):
        TrainConfig(format="sfp8", ptq_init="imatrix")


def test_latents_on_a_finer_lattice_move_off_q4_0s_boundaries_with_the_same_codes():
    """A model dequantized from Q5_0 (the gguf package's quantizer: llama.cpp's) has about half its weights on Q4_0's
    rounding ties (odd multiples of d5 under d = 2 d5): a tiny update would flip them all. Moved off, the codes and
    scales are identical and the same tiny update flips (almost) none; a continuous weight barely moves."""
    from gguf import GGMLQuantizationType as GT
    from gguf import quants

    from gemma3_qat.formats import get_format

    torch.manual_seed(0)
    f = get_format("int4-block")
    raw = torch.randn(64, 256) * 0.03
    on_q5 = torch.from_numpy(quants.dequantize(quants.quantize(raw.numpy(), GT.Q5_0), GT.Q5_0).reshape(raw.shape))
    moved, n = f.off_boundaries(on_q5)
    assert n > 0.3 * on_q5.numel()
    before, after = f.quantize(on_q5), f.quantize(moved)
    assert torch.equal(before.codes, after.codes) and torch.equal(before.scales, after.scales)
    nudge = torch.sign(torch.randn_like(raw)) * 1e-6  # far below a step (~0.01), like one early AdamW update

    def flipped(w):
        return (f.quantize(w + nudge).codes != f.quantize(w).codes).float().mean().item()

    assert flipped(on_q5) > 0.15 and flipped(moved) < 0.001
    _, n_raw = f.off_boundaries(raw)
    assert n_raw < 0.001 * raw.numel()


def test_training_start_moves_a_finer_lattice_off_the_boundaries_and_says_so():
    from gguf import GGMLQuantizationType as GT
    from gguf import quants
    from transformers import Gemma3ForCausalLM

    from builders import tiny_text_config
    from gemma3_qat.models import quantizable_linears
    from gemma3_qat.qat.ptq_init import move_off_boundaries

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(tiny_text_config(512))
    assert move_off_boundaries(model, "int4-block") is None  # random init: nothing on a boundary to speak of
    with torch.no_grad():
        for lin in quantizable_linears(model).values():
            w = lin.weight.numpy()
            lin.weight.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, GT.Q5_0), GT.Q5_0).reshape(w.shape)))
    line = move_off_boundaries(model, "int4-block")
    assert line is not None and "rounding boundaries" in line
    assert move_off_boundaries(model, "int4-block") is None  # once moved, nothing is left on a boundary
