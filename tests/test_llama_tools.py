"""Against llama.cpp's own quantizer (``llama-quantize``, built by scripts/install.sh --test from the llama.cpp our
llama-cpp-python vendors): our Q4_0 is its Q4_0 byte for byte, a QAT run's unquantized export re-quantizes to the
very file we ship (with and without the learned scales), and the PTQ baselines of benchmarks/quality.py build."""

import sys
from pathlib import Path

import numpy as np
import pytest

from gemma3_qat.exporters.gguf import export_gguf
from gemma3_qat.exporters.safetensors import export_safetensors
from gemma3_qat.gguf_file import bits_per_weight, open_gguf
from gemma3_qat.runtimes import llama_tools


def tensors(path) -> dict:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in open_gguf(path).tensors}


def test_our_q4_0_is_llama_quantize_q4_0(tiny_text_dir, tmp_path):
    f32 = export_gguf(tiny_text_dir, tmp_path / "f32.gguf", plain_type="f32", log=None).path
    ours = export_gguf(tiny_text_dir, tmp_path / "ours.gguf", plain_type="q4_0", embedding_type="q8_0", log=None).path
    theirs = llama_tools.quantize(f32, tmp_path / "theirs.gguf", "Q4_0", embedding_type="q8_0")
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    assert {n for n in a if a[n] != b[n]} == set()
    assert bits_per_weight(ours)[0] == 4.5 and bits_per_weight(f32)[0] == 32.0


@pytest.mark.parametrize("extra", [{}, {"scale_grad": 1.0}, {"ptq_init": "imatrix"}],
                         ids=["straight-through", "learned-scales", "imatrix-init"])
def test_qat_unquantized_export_requantizes_losslessly(tiny_text_dir, sample_data, tmp_path, extra):
    """The runtime rule is kept with learned scales and with the imatrix-searched start too, so llama.cpp's own
    convert_hf_to_gguf.py + llama-quantize Q4_0 of our ``unquantized`` safetensors gives back exactly the GGUF
    tensors we export."""
    from gemma3_qat.qat.train import TrainConfig, train

    config = TrainConfig(model=str(tiny_text_dir), format="int4-block", data=[str(sample_data / "text.jsonl")],
                         seq_len=64, batch_size=2, micro_batch_size=2, steps=3, lr=1e-3, warmup_steps=1,
                         eval_every=100, eval_rows=2, save_every=100, **extra,
                         output=str(tmp_path / "run"))
    run = train(config, log=lambda *_: None)
    ours = export_gguf(run, tmp_path / "ours.gguf", embedding_type="q8_0", log=None).path
    plain = export_safetensors(run, tmp_path / "unquantized", dtype="f32", log=None)
    f32 = llama_tools.convert_hf(plain.path, tmp_path / "f32.gguf")  # llama.cpp's converter, then its quantizer
    requantized = llama_tools.quantize(f32, tmp_path / "requantized.gguf", "Q4_0", embedding_type="q8_0")
    a, b = tensors(ours), tensors(requantized)
    assert {n for n in a if a[n] != b[n]} == set()


def test_ptq_baselines_build_with_an_imatrix(tmp_path):
    """benchmarks/quality.py's llama.cpp PTQ files, on the embedded model: imatrix from the training rows' text,
    each file of its type, bits per weight in order."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality

    peers = [f[0].removesuffix(".gguf") for f in quality.PTQ_FILES if "int4-block" in f[4]]  # the -e4 ones too
    files = {p.name: p for p in quality.build_ptq_baselines(
        tmp_path, quality.wanted_ptq_files(["int4-block"], quality.RECIPE, peers))}
    assert set(files) == {f"{name}.gguf" for name in peers}
    assert tensors(files["llama-q4_0.gguf"])["token_embd.weight"][0] == "Q8_0"  # as our default exports it
    assert tensors(files["llama-imatrix-q4_0-e4.gguf"])["token_embd.weight"][0] == "Q4_0"  # all-Q4_0
    assert (tmp_path / "calibration.txt").stat().st_size > 100_000  # the training rows, not a sample
    rtn, weighted = tensors(files["llama-q4_0.gguf"]), tensors(files["llama-imatrix-q4_0.gguf"])
    assert rtn["blk.0.attn_q.weight"][0] == weighted["blk.0.attn_q.weight"][0] == "Q4_0"
    assert rtn["blk.0.attn_q.weight"][1] != weighted["blk.0.attn_q.weight"][1]  # the imatrix changed the scales
    assert tensors(files["llama-imatrix-iq4_nl.gguf"])["blk.0.ffn_up.weight"][0] == "IQ4_NL"
    bits = {name: bits_per_weight(p)[0] for name, p in files.items()}
    assert bits["llama-q4_0.gguf"] == 4.5 < bits["llama-imatrix-q4_k_m.gguf"] < 5.0
