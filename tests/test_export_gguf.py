"""GGUF export: read back with the gguf package's reader and dequantizers and compare bit for bit."""

import json
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader, TokenType
from gguf import quants as gq
from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

from gemma3_qat.checkpoint import QATMetadata
from gemma3_qat.exporters.gguf import ExportError, export_gguf, text_gguf_name
from gemma3_qat.gguf_file import inspect_gguf
from gemma3_qat.formats import get_format
from gemma3_qat.models import NotGemma3Error, quantizable_linears
from gemma3_qat.qat.prepare import prepare


def make_qat_checkpoint(qat_run, src, out, fmt, quantize_embeddings, multimodal=False, mixed_precision="no"):
    """A copy at ``out`` of the run directory the trainer wrote for ``src`` (the ``qat_run`` fixture), and its
    fake-quant student as export reads it: the latent weights loaded and prepared by the run's qat.json."""
    shutil.copytree(qat_run(src, fmt, quantize_embeddings, mixed_precision=mixed_precision), out)
    cls = Gemma3ForConditionalGeneration if multimodal else AutoModelForCausalLM
    model = cls.from_pretrained(out, dtype=torch.float32)
    meta = QATMetadata.read(out / "qat.json")
    assert (meta.format, meta.quantize_embeddings) == (fmt, quantize_embeddings)
    prepare(model, fmt, quantize_embeddings=quantize_embeddings)
    return model


def tensors(path):
    reader = GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def values(t):
    """Dequantized values of a GGUF tensor, shaped like the torch tensor."""
    data = np.asarray(t.data)
    if t.tensor_type in (GT.F32, GT.F16):
        out = data.astype(np.float32)
    else:
        out = gq.dequantize(data, t.tensor_type)
    return out.reshape([int(x) for x in t.shape[::-1]])


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("fmt", ["int4-block", "int4-channel"])
@pytest.mark.parametrize("quantize_embeddings", [False, True], ids=["body", "body+embedding"])
@pytest.mark.parametrize("precision", ["no", "bf16"], ids=["fp32", "bf16"])
def test_read_back_equals_fake_quant_weights_bit_for_bit(qat_run, tiny_text_dir, tmp_path, fmt, quantize_embeddings,
                                                         precision):
    """Trained in fp32 or under bf16 autocast, the export holds the codes of the run's fp32 latent weights."""
    model = make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", fmt, quantize_embeddings,
                                mixed_precision=precision)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", log=None)
    reader, ts = tensors(tmp_path / "m.gguf")
    f = get_format(fmt)
    for name, linear in quantizable_linears(model).items():
        t = ts[text_gguf_name(name + ".weight")]
        assert t.tensor_type == GT.Q4_0
        want = f.fake_quantize_values(linear.weight).numpy()
        np.testing.assert_array_equal(values(t).view(np.uint32), want.view(np.uint32), err_msg=name)
    emb = model.model.embed_tokens.weight
    t = ts["token_embd.weight"]
    if quantize_embeddings:
        assert t.tensor_type == GT.Q4_0
        np.testing.assert_array_equal(values(t), f.fake_quantize_values(emb).numpy())
    else:  # auto: Q8_0 by the gguf package's (= llama.cpp's) reference rule
        assert t.tensor_type == GT.Q8_0
        np.testing.assert_array_equal(np.asarray(t.data), gq.quantize(emb.detach().numpy(), GT.Q8_0))
    # norms: F32, Gemma's (1 + w) folded in
    norm = ts["blk.0.attn_norm.weight"]
    assert norm.tensor_type == GT.F32
    np.testing.assert_array_equal(values(norm), model.model.layers[0].input_layernorm.weight.detach().numpy() + 1)
    assert "output.weight" not in ts  # tied head: llama.cpp reuses token_embd
    assert field(reader, "general.file_type") == 2  # MOSTLY_Q4_0
    assert field(reader, "gemma3_qat.format") == fmt


def test_sfp8_exports_exact_values(qat_run, tiny_text_dir, tmp_path):
    model = make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", "sfp8", True)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", log=None)
    _, ts = tensors(tmp_path / "m.gguf")
    sfp8 = get_format("sfp8")
    for name, linear in quantizable_linears(model).items():
        t = ts[text_gguf_name(name + ".weight")]
        assert t.tensor_type in (GT.BF16, GT.F32)
        np.testing.assert_array_equal(values(t), sfp8.fake_quantize_values(linear.weight).numpy(), err_msg=name)
    # --lossy: Q8_0 of those values, with the error to show for it
    export_gguf(tmp_path / "ckpt", tmp_path / "lossy.gguf", lossy=True, log=None)
    _, lossy = tensors(tmp_path / "lossy.gguf")
    assert lossy["blk.0.attn_q.weight"].tensor_type == GT.Q8_0


@pytest.mark.parametrize("plain_type", ["q8_0", "f16", "q4_0"])
def test_plain_conversion_matches_the_reference_quantizers(tiny_text_dir, tmp_path, plain_type):
    export_gguf(tiny_text_dir, tmp_path / "m.gguf", plain_type=plain_type, log=None)
    reader, ts = tensors(tmp_path / "m.gguf")
    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32)
    ref_type = {"q8_0": GT.Q8_0, "f16": GT.F16, "q4_0": GT.Q4_0}[plain_type]
    for name, linear in quantizable_linears(model).items():
        t = ts[text_gguf_name(name + ".weight")]
        assert t.tensor_type == ref_type
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1),
                                      gq.quantize(linear.weight.detach().numpy(), ref_type).reshape(-1))
    expected_embedding = GT.F16 if plain_type == "f16" else GT.Q8_0
    assert ts["token_embd.weight"].tensor_type == expected_embedding


def test_metadata_follows_the_spec(tiny_text_dir, tmp_path):
    export_gguf(tiny_text_dir, tmp_path / "m.gguf", plain_type="f32", log=None)
    reader, ts = tensors(tmp_path / "m.gguf")
    config = json.loads((tiny_text_dir / "config.json").read_text())
    expected = {
        "general.architecture": "gemma3",
        "gemma3.context_length": config["max_position_embeddings"],
        "gemma3.embedding_length": config["hidden_size"],
        "gemma3.block_count": config["num_hidden_layers"],
        "gemma3.feed_forward_length": config["intermediate_size"],
        "gemma3.attention.head_count": config["num_attention_heads"],
        "gemma3.attention.head_count_kv": config["num_key_value_heads"],
        "gemma3.attention.key_length": config["head_dim"],
        "gemma3.attention.value_length": config["head_dim"],
        "gemma3.rope.freq_base": 1e6,
        "gemma3.rope.freq_base_swa": 1e4,
        "gemma3.attention.sliding_window": config["sliding_window"],
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "general.quantization_version": 2,
    }
    for key, value in expected.items():
        assert field(reader, key) == pytest.approx(value), key
    assert field(reader, "gemma3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert "gemma3.rope.scaling.type" not in reader.fields  # no rope scaling in this config
    assert not any("softcap" in k for k in reader.fields)
    assert "{{ bos_token }}" in field(reader, "tokenizer.chat_template")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    for special in ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<mask>"):
        assert types[tokens.index(special)] == TokenType.CONTROL, special
    assert types[tokens.index("<unk>")] == TokenType.CONTROL  # special in tokenizer_config: control for llama.cpp
    assert types[tokens.index("<0x41>")] == TokenType.BYTE
    assert len(tokens) == ts["token_embd.weight"].shape[-1]


def test_rope_scaling_is_written_only_when_configured(tokenizer_dir, tmp_path):
    from builders import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "scaled", tokenizer_dir)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"]["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    (path / "config.json").write_text(json.dumps(config))
    export_gguf(path, tmp_path / "m.gguf", plain_type="f32", log=None)
    reader, _ = tensors(tmp_path / "m.gguf")
    assert field(reader, "gemma3.rope.scaling.type") == "linear"
    assert field(reader, "gemma3.rope.scaling.factor") == 8.0


def test_multimodal_exports_text_and_mmproj(qat_run, tiny_multimodal_dir, tmp_path):
    model = make_qat_checkpoint(qat_run, tiny_multimodal_dir, tmp_path / "ckpt", "int4-block", False,
                                multimodal=True)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", log=None)
    _, text = tensors(tmp_path / "m.gguf")
    assert not any(n.startswith(("v.", "mm.")) for n in text)
    assert text["blk.5.ffn_down.weight"].tensor_type == GT.Q4_0
    reader, mm = tensors(tmp_path / "mmproj-m.gguf")
    assert field(reader, "general.architecture") == "clip"
    assert field(reader, "general.type") == "mmproj"
    assert field(reader, "clip.projector_type") == "gemma3"
    assert field(reader, "clip.has_vision_encoder") is True
    assert field(reader, "clip.use_gelu") is True
    vc = model.config.vision_config
    assert field(reader, "clip.vision.projection_dim") == model.config.text_config.hidden_size
    assert field(reader, "clip.vision.image_size") == vc.image_size
    assert field(reader, "clip.vision.patch_size") == vc.patch_size
    assert field(reader, "clip.vision.embedding_length") == vc.hidden_size
    assert field(reader, "clip.vision.feed_forward_length") == vc.intermediate_size
    assert field(reader, "clip.vision.block_count") == vc.num_hidden_layers
    assert field(reader, "clip.vision.attention.head_count") == vc.num_attention_heads
    assert field(reader, "clip.vision.projector.scale_factor") == 2  # 4x4 patches pooled to 2x2 tokens
    expected = {"v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight", "v.post_ln.weight",
                "v.post_ln.bias", "mm.input_projection.weight", "mm.soft_emb_norm.weight"}
    for i in range(vc.num_hidden_layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            expected |= {f"v.blk.{i}.{part}.weight", f"v.blk.{i}.{part}.bias"}
    assert set(mm) == expected
    assert mm["v.patch_embd.weight"].tensor_type == GT.F32
    assert mm["mm.input_projection.weight"].tensor_type == GT.F16
    proj = model.model.multi_modal_projector
    np.testing.assert_array_equal(values(mm["mm.soft_emb_norm.weight"]), proj.mm_soft_emb_norm.weight.detach().numpy() + 1)
    np.testing.assert_array_equal(values(mm["mm.input_projection.weight"]),
                                  proj.mm_input_projection_weight.detach().half().float().numpy())
    tower = model.model.vision_tower
    siglip_ln = getattr(tower, "vision_model", tower).post_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(values(mm["v.post_ln.weight"]), siglip_ln)  # no +1 on SigLIP LayerNorms


def test_inspect_reports_tensors_and_totals(qat_run, tiny_text_dir, tmp_path):
    make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", "int4-block", True)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", log=None)
    info = inspect_gguf(tmp_path / "m.gguf")
    assert info["tensor_bytes"] == sum(t["bytes"] for t in info["tensors"]) < info["file_bytes"]
    q = next(t for t in info["tensors"] if t["name"] == "blk.0.ffn_up.weight")
    assert q["type"] == "Q4_0" and q["shape"] == [128, 64] and q["bytes"] == 128 * 64 // 32 * 18
    assert info["metadata"]["tokenizer.ggml.tokens"].startswith("[array of")


# --------------------------------------------------------------------------------------------- bad input


def test_refuses_to_overwrite_and_writes_nothing_on_error(tiny_text_dir, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(tiny_text_dir, out, plain_type="f16", log=None)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        export_gguf(tiny_text_dir, out, plain_type="q8_0", log=None)
    assert out.read_bytes() == before
    export_gguf(tiny_text_dir, out, plain_type="q8_0", force=True, log=None)
    assert out.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.md"]  # no temporary files left


def test_bad_checkpoints_give_clear_errors(qat_run, tiny_text_dir, tmp_path, tokenizer_dir):
    not_gemma = tmp_path / "llama"
    not_gemma.mkdir()
    (not_gemma / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NotGemma3Error, match="not a Gemma 3 checkpoint"):
        export_gguf(not_gemma, tmp_path / "x.gguf", log=None)

    bad_format = tmp_path / "bad-format"
    shutil.copytree(tiny_text_dir, bad_format)
    (bad_format / "qat.json").write_text(json.dumps({"format": "int3-magic"}))
    with pytest.raises(ValueError, match="unknown format 'int3-magic'"):
        export_gguf(bad_format, tmp_path / "x.gguf", log=None)

    no_sp = tmp_path / "no-sp"
    shutil.copytree(tiny_text_dir, no_sp)
    (no_sp / "tokenizer.model").unlink()
    (no_sp / "tokenizer.json").unlink()  # tokenizer.json alone suffices (tests/test_vocab.py): neither is refused
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        export_gguf(no_sp, tmp_path / "x.gguf", log=None)

    from builders import build_tiny_checkpoint

    odd = build_tiny_checkpoint(tmp_path / "odd", tokenizer_dir, ffn=80)
    shutil.copytree(qat_run(odd, "int4-channel", False, steps=0), tmp_path / "odd-qat")
    with pytest.raises(ExportError, match="down_proj.*multiple of 32"):
        export_gguf(tmp_path / "odd-qat", tmp_path / "x.gguf", log=None)
    with pytest.raises(ExportError, match="unknown --type"):
        export_gguf(tiny_text_dir, tmp_path / "x.gguf", plain_type="q5_k", log=None)
    assert not (tmp_path / "x.gguf").exists()
    assert not list(tmp_path.glob(".x.gguf*"))
