"""safetensors export: unquantized (transformers, llama.cpp re-quantization), compressed-tensors (vLLM), sfp8."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

from gemma3_qat.exporters.safetensors import SafetensorsExportError, export_safetensors, load_sfp8, pack_int4
from gemma3_qat.formats import get_format, q4_0_blocks
from gemma3_qat.models import quantizable_linears
from test_export_gguf import make_qat_checkpoint


def ids():
    return torch.randint(9, 500, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fmt", ["int4-block", "int4-channel", "sfp8"])
def test_unquantized_reloads_to_the_fake_quant_students_logits(qat_run, tiny_text_dir, tmp_path, fmt):
    student = make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", fmt, quantize_embeddings=True)
    export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="unquantized", log=None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, student.eval()(input_ids=ids()).logits,
                                   rtol=0, atol=1e-5)
    if fmt == "int4-block":  # llama.cpp's Q4_0 re-quantizes the values to the trained codes and scales exactly
        w = load_file(str(tmp_path / "out" / "model.safetensors"))
        for name, linear in quantizable_linears(student).items():
            trained = q4_0_blocks(get_format(fmt).quantize(linear.weight))
            assert np.array_equal(gq.quantize(w[name + ".weight"].numpy(), GT.Q4_0), trained), name


def test_unquantized_f16_still_requantizes_to_the_trained_bytes(qat_run, tiny_text_dir, tmp_path):
    student = make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", "int4-block",
                                  quantize_embeddings=False)
    export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="unquantized", dtype="f16", log=None)
    w = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, linear in quantizable_linears(student).items():
        assert w[name + ".weight"].dtype == torch.float16
        requant = gq.quantize(w[name + ".weight"].float().numpy(), GT.Q4_0)
        assert np.array_equal(requant, q4_0_blocks(get_format("int4-block").quantize(linear.weight))), name
    with pytest.raises(SafetensorsExportError, match="f16 cannot hold SFP8"):
        make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "sfp8", "sfp8", quantize_embeddings=False)
        export_safetensors(tmp_path / "sfp8", tmp_path / "x", layout="unquantized", dtype="f16", log=None)


@pytest.mark.parametrize("fmt", ["int4-block", "int4-channel"])
def test_compressed_tensors_decompresses_to_the_fake_quant_weights(qat_run, tiny_text_dir, tmp_path, fmt):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    student = make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", fmt, quantize_embeddings=False)
    export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="compressed-tensors", log=None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    scheme = qc.config_groups["group_0"]
    assert scheme.weights.strategy == ("group" if fmt == "int4-block" else "channel")
    w = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, linear in quantizable_linears(student).items():
        module = {k.removeprefix(name + "."): v for k, v in w.items() if k.startswith(name + ".")}
        assert set(module) == {"weight_packed", "weight_scale", "weight_shape"}
        out = PackedQuantizationCompressor.decompress(module, scheme)
        want = get_format(fmt).fake_quantize_values(linear.weight)
        assert torch.equal(out["weight"].float(), want), name
    assert w["model.embed_tokens.weight"].dtype == torch.bfloat16  # not quantized here: kept as the model dtype


def test_pack_int4_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 16, (5, 72), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert torch.equal(pack_int4(codes), pack_to_int32((codes.to(torch.int16) - 8).to(torch.int8), 4))


def test_sfp8_layout_restores_exact_values_in_one_byte_per_weight(qat_run, tiny_text_dir, tmp_path):
    student = make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", "sfp8", quantize_embeddings=False)
    export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="sfp8", log=None)
    state = load_sfp8(tmp_path / "out")
    quantized = 0
    for name, linear in quantizable_linears(student).items():
        assert torch.equal(state[name + ".weight"], get_format("sfp8").fake_quantize_values(linear.weight)), name
        quantized += linear.weight.numel()
    raw = load_file(str(tmp_path / "out" / "model.safetensors"))
    rest = sum(v.numel() * v.element_size() for k, v in raw.items() if not k.endswith((".sfp8_codes", ".sfp8_scale")))
    size = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert size <= 1.01 * (quantized + rest) + 16_384  # + the JSON header
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "gemma3-qat-sfp8"


def test_multimodal_round_trip_keeps_the_vision_tower_bit_identical(qat_run, tiny_multimodal_dir, tmp_path):
    student = make_qat_checkpoint(qat_run, tiny_multimodal_dir, tmp_path / "ckpt", "int4-block", False,
                                  multimodal=True)
    export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="unquantized", log=None)
    keys = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in keys)
    assert any(k.startswith("multi_modal_projector.") for k in keys)
    reloaded = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    before = {k: v for k, v in student.state_dict().items() if "vision" in k or "projector" in k}
    after = reloaded.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())


def test_bad_input(qat_run, tiny_text_dir, tmp_path):
    with pytest.raises(SafetensorsExportError, match="no qat.json"):
        export_safetensors(tiny_text_dir, tmp_path / "x", log=None)
    make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", "sfp8", False)
    with pytest.raises(SafetensorsExportError, match="compressed-tensors holds int4"):
        export_safetensors(tmp_path / "ckpt", tmp_path / "x", layout="compressed-tensors", log=None)
    with pytest.raises(SafetensorsExportError, match="unknown --layout"):
        export_safetensors(tmp_path / "ckpt", tmp_path / "x", layout="gptq", log=None)
    export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="sfp8", log=None)
    with pytest.raises(FileExistsError, match="--force"):
        export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="sfp8", log=None)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_large_exports_are_sharded_with_an_index(qat_run, tiny_text_dir, tmp_path):
    student = make_qat_checkpoint(qat_run, tiny_text_dir, tmp_path / "ckpt", "int4-block",
                                  quantize_embeddings=True)
    export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="unquantized", max_shard_bytes=200_000, log=None)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids()).logits, student.eval()(input_ids=ids()).logits,
                                   rtol=0, atol=1e-5)
    # the exporters read sharded checkpoints too: the on-grid values re-quantize to the trained Q4_0 bytes
    from gguf import GGUFReader

    from gemma3_qat.exporters.gguf import export_gguf, text_gguf_name

    export_gguf(tmp_path / "out", tmp_path / "m.gguf", log=None)
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for name, linear in quantizable_linears(student).items():
        trained = q4_0_blocks(get_format("int4-block").quantize(linear.weight))
        assert np.array_equal(np.asarray(tensors[text_gguf_name(name + ".weight")].data), trained), name
