"""The emulation of llama.cpp's CPU arithmetic (``runtimes/llama_arithmetic.py``) against gguf-py's Q8_0 and real
llama.cpp.

llama.cpp rounds each quantized matmul's activations (Q8_0 under Q4_0 weights, Q8_K under K-quants), reads GELU from
an fp16 table and keeps K and V in fp16. With one quantized tensor type in a file, the emulated model in PyTorch
computes what llama.cpp computes from it (a small fraction of the gap to the plain model is left). With every
matmul quantized, one activation that rounds the other way in an early layer moves later layers' activations across
rounding boundaries too: the emulation then shows the size of llama.cpp's arithmetic (how far it puts the model
from its own float values), not its realisation.
"""

import shutil

import numpy as np
import pytest
import torch

from gemma3_qat.runtimes.llama_arithmetic import ggml_gelu, round_q8_0, round_q8_k


def test_q8_0_rounding_is_gguf_pys():
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 256)) * rng.choice([1e-3, 1.0, 30.0], (16, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    x[1, 5] = 4e3  # an outlier that sets its block's scale
    x[2, 32:64] = 0.75  # all equal
    ref = quants.dequantize(quants.quantize(x, T.Q8_0), T.Q8_0)
    assert np.array_equal(round_q8_0(torch.from_numpy(x)).numpy(), ref)


def test_q8_k_rounding_follows_the_largest_magnitude():
    x = torch.tensor([[0.5, -2.0, 1.0, 0.25] * 64])
    y = round_q8_k(x)  # -2.0 sets the scale: d = 2/127, the extreme exactly
    assert y[0, 1] == -2.0 and torch.allclose(y, x, atol=1 / 127) and not torch.equal(y, x)
    assert torch.equal(round_q8_k(torch.zeros(1, 256)), torch.zeros(1, 256))


def test_gelu_is_ggmls_fp16_table():
    x = torch.tensor([-12.0, -10.0, -1.2345, 0.0, 0.3337, 2.71828, 9.99, 10.0, 55.5])
    y = ggml_gelu(x)
    assert y[0] == 0 and y[1] == 0 and y[-2] == 10.0 and y[-1] == 55.5
    assert torch.equal(y[2:7], y[2:7].half().float())  # fp16 values
    assert torch.allclose(y, torch.nn.functional.gelu(x, approximate="tanh"), atol=5e-3)


llama_cpp = pytest.importorskip("llama_cpp")

MATMULS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def file_values_model(checkpoint, gguf):
    """The plain checkpoint with each quantized tensor replaced by the file's own (dequantized) values."""
    from gguf import GGUFReader
    from gguf import quants as gq

    from gemma3_qat.layout import text_gguf_name
    from gemma3_qat.sources import load_gemma3

    model = load_gemma3(str(checkpoint), dtype=torch.float32).eval()
    held = {t.name: t for t in GGUFReader(gguf).tensors if t.tensor_type.name != "F32"}
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = held.get(text_gguf_name(name) or "")
            if t is not None:
                p.copy_(torch.from_numpy(np.asarray(gq.dequantize(t.data, t.tensor_type)).copy()).reshape(p.shape))
    return model


@pytest.mark.llama
@pytest.mark.slow
def test_the_emulation_computes_what_llama_cpp_computes(qat_run, tmp_path):
    from gemma3_qat.assets import default_model_path
    from gemma3_qat.evaluate import LlamaCppModel, compare_logits, evaluation_windows, model_logits
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.exporters.safetensors import export_safetensors
    from gemma3_qat.runtimes import llama_tools
    from gemma3_qat.runtimes.llama_arithmetic import llama_cpp_arithmetic
    from gemma3_qat.tokenizer import load_tokenizer

    if not llama_tools.available():
        pytest.skip("llama.cpp's tools are not built (scripts/build_llama_tools.sh)")
    teacher = default_model_path()
    run = tmp_path / "run"
    shutil.copytree(qat_run(teacher, "int4-block", True, steps=0), run)
    values = export_safetensors(run, tmp_path / "values", layout="unquantized", log=None).path
    (values / "qat.json").unlink()  # a plain checkpoint of the run's Q4_0 values
    f32 = export_gguf(values, tmp_path / "values-f32.gguf", plain_type="f32", log=None).path
    ids, labels, _ = evaluation_windows(load_tokenizer(teacher), seq_len=256, max_windows=4)

    def kls(gguf):
        model = file_values_model(values, gguf)
        plain = list(model_logits(model, ids))
        with llama_cpp_arithmetic(model, gguf):
            emulated = list(model_logits(model, ids))
        with LlamaCppModel(gguf, n_ctx=ids.shape[1]) as m:
            llama = [torch.from_numpy(m.logits(w.tolist())) for w in ids]
        return [compare_logits(a, b, labels)[1] for a, b in ((llama, plain), (llama, emulated), (emulated, plain))]

    # one quantized type at a time (the rest F32): the emulation tracks llama.cpp
    singles = {"attn_v Q4_0": ("Q4_0", "attn_v", "f32"), "ffn_down Q4_0": ("Q4_0", "ffn_down", "f32"),
               "ffn_down Q4_K": ("Q4_K", "ffn_down", "f32"), "output Q4_0": ("Q4_0", None, "q4_0")}
    for label, (qtype, tensor, embedding) in singles.items():
        out = llama_tools.quantize(f32, tmp_path / f"{label.replace(' ', '-')}.gguf", qtype, pure=True,
                                   embedding_type=embedding,
                                   tensor_types={m: "f32" for m in MATMULS if m != tensor})
        plain, emulated, size = kls(out)
        print(f"\n{label} alone, llama.cpp vs the file's values in PyTorch: KL {plain:.2e}; vs the emulation "
              f"{emulated:.2e}")
        assert emulated <= 0.2 * plain and abs(size - plain) <= 0.2 * plain, label

    # every matmul Q4_0: the emulation moves the model as far from its float values as llama.cpp does
    plain, emulated, size = kls(export_gguf(run, tmp_path / "q4_0.gguf", log=None).path)
    print(f"the whole Q4_0 file, llama.cpp vs its values in PyTorch: KL {plain:.2e}; vs the emulation {emulated:.2e}; "
          f"the emulation vs the values, both in PyTorch: {size:.2e}")
    assert 0.5 * plain <= size <= 2 * plain
