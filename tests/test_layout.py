"""One home per fact: the shared layout (names, roles, "which tensors are quantized", GGUF types) and a format's
container facts. The acceptance test registers a throwaway format in this file only and exports it."""


import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, LlamaFileType
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq
from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

from gemma3_qat.checkpoint import Checkpoint, QATMetadata, write_qat_checkpoint
from gemma3_qat.exporters.gguf import export_gguf, plan_text_export
from gemma3_qat.layout import (
    MATMUL_ROLES, ExportError, GGUFTypes, is_quantized, tensor_role, text_gguf_name, vision_gguf_name,
)
from gemma3_qat.formats import FORMATS, QuantizedWeight, WeightFormat, get_format
from gemma3_qat.models import ROLES, quantizable_linears
from gemma3_qat.qat.prepare import prepare


# --------------------------------------------------------------------------------------------- quantized tensors


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_the_name_rule_agrees_with_the_module_rule(tiny_text_dir, tiny_multimodal_dir, kind):
    path = tiny_text_dir if kind == "text" else tiny_multimodal_dir
    cls = AutoModelForCausalLM if kind == "text" else Gemma3ForConditionalGeneration
    model = cls.from_pretrained(path, dtype=torch.float32)
    names = Checkpoint(path).names()  # the saved keys (a multimodal file may use the legacy layout)
    modules = {text_gguf_name(name + ".weight") for name in quantizable_linears(model)}  # layout-free identity
    assert modules and {text_gguf_name(n) for n in names if is_quantized(n, quantize_embeddings=False)} == modules
    embedding = [n for n in names if tensor_role(n) == "embedding"]
    assert len(embedding) == 1
    assert {text_gguf_name(n) for n in names if is_quantized(n, quantize_embeddings=True)} == modules | {
        "token_embd.weight"}
    assert all(tensor_role(n) in ROLES for n in names if n != "lm_head.weight")


def test_roles_are_the_memory_groups_and_names_round_trip():
    from gemma3_qat.memory.spec import model_spec, model_tensors

    tensors = model_tensors(model_spec("4b"))  # multimodal: text, vision tower and projector
    assert {t.group for t in tensors} == set(ROLES)
    for t in tensors:
        assert tensor_role(t.name) == t.group, t.name
        assert (t.group in MATMUL_ROLES) == t.is_matmul
        name = vision_gguf_name(t.name) if t.group in ("vision", "projector") else text_gguf_name(t.name)
        assert name is not None, t.name
    assert tensor_role("lm_head.weight") is None and text_gguf_name("lm_head.weight") is None
    with pytest.raises(ExportError, match="unexpected tensor"):
        tensor_role("model.layers.0.mlp.fc9.weight")


def test_gguf_type_policy():
    block = GGUFTypes(get_format("int4-block"))
    assert block.ggml_type("attention", "blk.0.attn_q.weight", (64, 64)) == GT.Q4_0
    assert block.ggml_type("embedding", "token_embd.weight", (512, 64)) == GT.Q8_0  # auto, not trained
    assert block.ggml_type("norms", "blk.0.attn_norm.weight", (64,)) == GT.F32
    assert block.ggml_type("vision", "v.patch_embd.weight", (8, 3, 14, 14)) == GT.F32
    assert block.ggml_type("projector", "mm.input_projection.weight", (32, 64)) == GT.F16
    assert GGUFTypes(get_format("int4-block"), quantize_embeddings=True).ggml_type(
        "embedding", "token_embd.weight", (512, 64)) == GT.Q4_0
    assert GGUFTypes(plain_type="bf16").ggml_type("embedding", "token_embd.weight", (512, 64)) == GT.BF16
    assert GGUFTypes().ggml_type("mlp", "blk.0.ffn_up.weight", (128, 64)) == GT.F16  # plain default f16
    sfp8 = get_format("sfp8")
    assert GGUFTypes(sfp8).ggml_type("mlp", "x", (1, 1)) == GT.BF16
    assert GGUFTypes(sfp8).ggml_type("mlp", "x", (1, 1), tensor_scale=torch.tensor(1.3)) == GT.F32
    assert GGUFTypes(sfp8, lossy=True).ggml_type("mlp", "x", (1, 1)) == GT.Q8_0
    with pytest.raises(ExportError, match="--lossy only applies to sfp8"):
        GGUFTypes(get_format("int4-channel"), lossy=True)
    with pytest.raises(ExportError, match="drop --type"):
        GGUFTypes(sfp8, plain_type="q8_0")
    with pytest.raises(ExportError, match="unknown --embedding-type"):
        GGUFTypes(embedding_type="q5_k")


# --------------------------------------------------------------------------------------------- a new format


class Int8Channel(WeightFormat):
    """A throwaway format: symmetric int8 codes, one fp16 scale per output row. In GGUF: Q8_0 with the row's
    scale in every block, exact (as int4-channel goes into Q4_0)."""

    name = "int8-channel-test"
    summary = "int8, one fp16 scale per row (test only)"
    runtimes = "llama.cpp as Q8_0"
    code_bits = 8
    code_name = "int8"
    granularity = "row"
    gguf_exact = (GT.Q8_0,)

    def quantize(self, weight):
        self.check_shape(tuple(weight.shape))
        w = weight.detach().to(torch.float32)
        scale = (w.abs().amax(dim=-1, keepdim=True) / 127).to(torch.float16)
        inv = torch.where(scale == 0, torch.zeros_like(w[:, :1]), 1.0 / scale.to(torch.float32))
        return QuantizedWeight(self.name, torch.round(w * inv).clamp_(-127, 127).to(torch.int8), scale)

    def dequantize(self, qw):
        return qw.codes.to(torch.float32) * qw.scales.to(torch.float32)

    def gguf_encode(self, rows, ggml_type, tensor_scale=None):
        qw = self.quantize(rows)
        block, size = GGML_QUANT_SIZES[GT.Q8_0]
        out, n = qw.codes.shape
        scales = qw.scales.expand(out, n // block).contiguous().numpy().reshape(out, n // block, 1).view(np.uint8)
        codes = qw.codes.numpy().reshape(out, n // block, block).view(np.uint8)
        return np.concatenate([scales, codes], axis=-1).reshape(out, n // block * size)


@pytest.fixture
def int8_channel(monkeypatch):
    """Register the throwaway format as if it were a class of the formats package: one registry entry, which the
    exporters and the memory model read at each call."""
    fmt = Int8Channel()
    monkeypatch.setitem(FORMATS, fmt.name, fmt)
    return fmt


def prepared_checkpoint(fmt, src, out):
    """The tiny model prepared with ``fmt``, written as the trainer writes a QAT checkpoint (0 steps)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    report = prepare(model, fmt.name)
    out.mkdir()
    write_qat_checkpoint(model, out, QATMetadata(fmt.name, False, report.quantized), src)
    return model


def test_a_new_format_is_one_class(int8_channel, tiny_text_dir, tmp_path):
    from gemma3_qat.memory import measure_gguf, model_spec, weight_bytes

    fmt = int8_channel
    assert fmt.bits_per_weight == 8.0 and fmt.gguf_type == "Q8_0" and fmt.compact_label == "int8+fp16/row"
    model = prepared_checkpoint(fmt, tiny_text_dir, tmp_path / "ckpt")

    # the GGUF planner and writer: the trained codes as Q8_0, read back bit for bit
    plan = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", log=None)
    assert plan.file_type == LlamaFileType.MOSTLY_Q8_0
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    linears = quantizable_linears(model)
    for name, linear in linears.items():
        t = tensors[text_gguf_name(name + ".weight")]
        assert t.tensor_type == GT.Q8_0
        got = gq.dequantize(np.asarray(t.data), GT.Q8_0).reshape(linear.weight.shape)
        want = fmt.fake_quantize_values(linear.weight).numpy()
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=name)
    assert reader.fields["gemma3_qat.format"].contents() == fmt.name

    # the memory model predicts the file tensor by tensor, and the compact container from the format's facts
    measured = measure_gguf(tmp_path / "m.gguf")
    assert measured.exact, measured.mismatches
    spec = model_spec(tiny_text_dir)
    compact = weight_bytes(spec, format=fmt.name, container="compact")
    shapes = [tuple(linear.weight.shape) for linear in linears.values()]
    assert compact.by_group["attention"] + compact.by_group["mlp"] == sum(o * i + 2 * o for o, i in shapes)
    assert compact.types["mlp"] == "int8+fp16/row"
    gguf = weight_bytes(spec, format=fmt.name, container="gguf")
    assert gguf.by_group["attention"] + gguf.by_group["mlp"] == sum(o * i // 32 * 34 for o, i in shapes)


def test_a_new_format_without_a_compressed_tensors_scheme_is_refused_there(int8_channel, tiny_text_dir, tmp_path):
    from gemma3_qat.exporters.safetensors import SafetensorsExportError, export_safetensors

    prepared_checkpoint(int8_channel, tiny_text_dir, tmp_path / "ckpt")
    with pytest.raises(SafetensorsExportError, match="cannot hold int8-channel-test.*--layout unquantized$"):
        export_safetensors(tmp_path / "ckpt", tmp_path / "x", layout="compressed-tensors", log=None)
    plan = export_safetensors(tmp_path / "ckpt", tmp_path / "out", layout="unquantized", dry_run=True, log=None)
    assert {t.kind for t in plan.tensors} == {"copy", "values"} and not (tmp_path / "out").exists()
    assert plan_text_export(Checkpoint(tmp_path / "ckpt"), tmp_path / "m.gguf").notes == []
