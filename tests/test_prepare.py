"""prepare / unprepare on tiny text-only and multimodal Gemma 3 models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

from gemma3_qat.formats import FormatError, get_format, lattice_formats
from gemma3_qat.models import find_parts, quantizable_linears
from gemma3_qat.qat.fake_quant import FakeQuantEmbedding, FakeQuantizer, FakeQuantLinear
from gemma3_qat.qat.prepare import fake_quantizers, prepare, qat_config_of, set_fake_quant_enabled, unprepare

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def load(path, multimodal):
    cls = Gemma3ForConditionalGeneration if multimodal else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def text_ids(seed=0, n=24):
    return torch.randint(9, 500, (2, n), generator=torch.Generator().manual_seed(seed))


def image_inputs(model):
    """input_ids with one image (boi, 4 soft tokens, eoi) and its pixels, for the multimodal model."""
    cfg = model.config
    ids = [2, cfg.boi_token_index] + [cfg.image_token_index] * cfg.mm_tokens_per_image + [cfg.eoi_token_index]
    ids += text_ids(n=10)[0].tolist()
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels, "token_type_ids": None}


def reference_with_dequantized_weights(path, multimodal, fmt, quantize_embeddings):
    """A plain model whose quantizable weights were replaced by their dequantized values."""
    ref = load(path, multimodal)
    fmt = get_format(fmt)
    with torch.no_grad():
        for linear in quantizable_linears(ref).values():
            linear.weight.copy_(fmt.fake_quantize_values(linear.weight))
        if quantize_embeddings:
            emb = find_parts(ref).text_model.embed_tokens.weight  # tied: the head reads it too
            emb.copy_(fmt.fake_quantize_values(emb))
    return ref


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
@pytest.mark.parametrize("quantize_embeddings", [False, True], ids=["body", "body+embedding"])
def test_exactly_the_expected_modules_are_fake_quantized(request, multimodal, quantize_embeddings):
    path = request.getfixturevalue("tiny_multimodal_dir" if multimodal else "tiny_text_dir")
    model = load(path, multimodal)
    report = prepare(model, "int4-block", quantize_embeddings=quantize_embeddings)
    base = "model.language_model" if multimodal else "model"
    expected = {f"{base}.layers.{i}.{p}" for i in range(6) for p in PROJECTIONS}
    if quantize_embeddings:
        expected |= {f"{base}.embed_tokens", "lm_head"}
    swapped = {n for n, m in model.named_modules() if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding))}
    assert swapped == expected == set(report.quantized)
    assert not any("vision" in n or "projector" in n or "norm" in n for n in swapped)
    assert report.frozen == (["model.vision_tower", "model.multi_modal_projector"] if multimodal else [])
    assert qat_config_of(model).format == "int4-block"
    # one quantizer per linear; the tied embedding and head share one
    assert len(fake_quantizers(model)) == 42 + (1 if quantize_embeddings else 0)
    if quantize_embeddings:
        assert model.lm_head.weight_fake_quant is find_parts(model).text_model.embed_tokens.weight_fake_quant


# the tiny models' rows (64, 128 wide) hold every lattice but Q4_K's and Q6_K's 256 (tests/test_kquant_export.py
# prepares those, and the q4_k_m mixture, on 256-wide models)
@pytest.mark.parametrize("fmt", [f for f in sorted(lattice_formats()) if f not in ("q4_k", "q6_k")])
@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
@pytest.mark.parametrize("quantize_embeddings", [False, True], ids=["body", "body+embedding"])
def test_logits_equal_model_with_dequantized_weights(request, fmt, multimodal, quantize_embeddings):
    path = request.getfixturevalue("tiny_multimodal_dir" if multimodal else "tiny_text_dir")
    model = load(path, multimodal)
    plain = model(input_ids=text_ids()).logits
    prepare(model, fmt, quantize_embeddings=quantize_embeddings)
    ref = reference_with_dequantized_weights(path, multimodal, fmt, quantize_embeddings)
    inputs = image_inputs(model) if multimodal else {"input_ids": text_ids()}
    with torch.no_grad():
        got, want = model(**inputs).logits, ref(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(model(input_ids=text_ids()).logits, plain, atol=1e-6)  # quantization did something
    set_fake_quant_enabled(model, False)
    torch.testing.assert_close(model(input_ids=text_ids()).logits, plain, rtol=0, atol=0)


def test_tied_head_reads_the_fake_quantized_table(tiny_text_dir):
    model = load(tiny_text_dir, False)
    prepare(model, "int4-channel", quantize_embeddings=True)
    table = get_format("int4-channel").fake_quantize_values(model.model.embed_tokens.weight)
    hidden = model.model(input_ids=text_ids()).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), hidden @ table.T, rtol=0, atol=1e-6)
    # the lookup keeps Gemma's sqrt(hidden) scale
    ids = text_ids()
    scale = model.config.hidden_size**0.5
    torch.testing.assert_close(model.model.embed_tokens(ids), table[ids] * scale, rtol=0, atol=0)


def test_vision_tower_is_frozen_and_bit_identical_after_a_step(tiny_multimodal_dir):
    model = load(tiny_multimodal_dir, True).train()
    prepare(model, "sfp8", quantize_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    inputs = image_inputs(model)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    opt.step()
    after = model.state_dict()
    frozen = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "vision" in n or "projector" in n)
    trained = [k for k in before if "language_model.layers" in k and k.endswith("proj.weight")]
    assert all(not torch.equal(before[k], after[k]) for k in trained)  # the language model did train


def test_quantized_values_are_recomputed_after_an_optimizer_step(tiny_text_dir):
    model = load(tiny_text_dir, False).train()
    prepare(model, "int4-block", quantize_embeddings=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = text_ids()
    for _ in range(2):  # two micro-steps reuse the cached values: gradients accumulate normally
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    fresh = load(tiny_text_dir, False)
    fresh.load_state_dict(model.state_dict())
    prepare(fresh, "int4-block", quantize_embeddings=True)
    with torch.no_grad():
        torch.testing.assert_close(got, fresh(input_ids=ids).logits, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_text_dir):
    grads = []
    for checkpointing in (False, True):
        model = load(tiny_text_dir, False).train()
        prepare(model, "int4-block", quantize_embeddings=True)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = text_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_generate_and_save_pretrained_keep_working(tiny_text_dir, tmp_path):
    model = load(tiny_text_dir, False)
    plain_keys = set(model.state_dict())
    latent = {k: v.clone() for k, v in model.state_dict().items()}
    prepare(model, "sfp8", quantize_embeddings=True)
    out = model.generate(text_ids()[:, :5], max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 11)
    assert set(model.state_dict()) == plain_keys  # same keys: save_pretrained writes a normal checkpoint
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path, False)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, latent[k]), k  # the latent weights, not the quantized ones


def test_unprepare_restores_plain_modules_sharing_the_parameters(tiny_text_dir):
    model = load(tiny_text_dir, False)
    params = {n: p for n, p in model.named_parameters()}
    emb_class = type(model.model.embed_tokens)
    prepare(model, "int4-block", quantize_embeddings=True)
    unprepare(model)
    assert not any(isinstance(m, (FakeQuantLinear, FakeQuantEmbedding, FakeQuantizer)) for m in model.modules())
    assert type(model.model.embed_tokens) is emb_class
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(model.config.hidden_size**0.5)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert qat_config_of(model) is None
    prepare(model, "sfp8")  # can be prepared again


def test_bad_input_is_refused_clearly(tiny_text_dir):
    model = load(tiny_text_dir, False)
    with pytest.raises(FormatError, match="unknown format 'q4_z'"):
        prepare(model, "q4_z")
    prepare(model, "int4-block")
    with pytest.raises(ValueError, match="already prepared"):
        prepare(model, "int4-block")
    from transformers import GPT2Config, GPT2LMHeadModel

    from gemma3_qat.models import NotGemma3Error

    with pytest.raises(NotGemma3Error, match="not a Gemma 3 model"):
        prepare(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), "sfp8")


def test_block_format_names_the_module_whose_shape_does_not_fit(tmp_path, tokenizer_dir):
    from builders import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "odd", tokenizer_dir, ffn=80)  # 80 is not a multiple of 32
    model = load(path, False)
    with pytest.raises(FormatError, match=r"model\.layers\.0\.mlp\.down_proj: .*multiple of 32"):
        prepare(model, "int4-block")
    prepare(model, "int4-channel")  # per-channel has no block constraint
