"""The vocabulary from ``tokenizer.json`` alone, at Google's real Gemma 3 tokenizer (262,144 pieces).

References: HF ``tokenizers`` (``Tokenizer.from_file``) for ids and decoded text; llama.cpp (a vocab-only load
of the exported GGUF, llama-cpp-python) and SentencePiece (the library gemma.cpp links) as the runtimes.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from gemma3_qat.errors import InputError, MissingFileError

os.environ.setdefault("GEMMA_CPP_BIN", str(Path(__file__).resolve().parents[2] / "shared" / "gemma-cpp" / "bin"))
TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "gemma3-tokenizer"
needs_tokenizer = pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(),
                                     reason=f"Google's Gemma 3 tokenizer is not at {TOKENIZER}")
SPACE = "\u2581"


def _small(rows: int):
    from builders import tiny_architecture

    return tiny_architecture(rows, hidden=64, ffn=128, layers=1)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Tiny random Gemma 3s with the real tokenizer (bf16, no tokenizer.model): 262,144 rows (text-only
    sizes) and 262,208 rows (multimodal sizes), each exported to GGUF (Q8_0, ~24 MB)."""
    from builders import build_random_gemma3
    from tokenizer_parity import parity_strings
    from gemma3_qat.exporters.gguf import export_gguf

    root = tmp_path_factory.mktemp("real-vocab")
    out = {"strings": parity_strings(TOKENIZER)}
    for rows in (262_144, 262_208):
        ckpt = build_random_gemma3(root / f"r{rows}", _small(rows))
        assert not (ckpt / "tokenizer.model").exists()
        export_gguf(ckpt, root / f"r{rows}.gguf", plain_type="q8_0", log=None)
        out[rows] = (ckpt, root / f"r{rows}.gguf")
    return out


def _check_parity(report, *, image_token_fits: bool):
    print(report.line())
    assert report.strings >= 2000
    # the one residual: a literal U+2581 run in the input next to a real space. HF matches the added token
    # "▁▁…" in the raw text before it maps spaces to "▁"; llama.cpp escapes the spaces first and merges the whole
    # run. One entry cannot hold both behaviours (typed USER_DEFINED instead, every space run would print "▁▁").
    residual = [s for kind, s in report.differences if kind == "ids"]
    assert all(SPACE in s for s in residual), residual
    assert len(residual) <= 4
    assert not [s for kind, s in report.differences if kind == "text"]
    beyond = [s for kind, s in report.differences if kind == "beyond"]
    if image_token_fits:
        assert not beyond
    else:  # HF gives <image_soft_token> the id 262,144, past the 262,144 rows: no runtime can embed it
        assert beyond and all("<image_soft_token>" in s for s in beyond)


@pytest.mark.slow
@needs_tokenizer
def test_llama_cpp_tokenizes_and_detokenizes_like_hf_at_262k(real):
    from tokenizer_parity import compare

    for rows in (262_144, 262_208):
        report = compare(real[rows][1], TOKENIZER / "tokenizer.json", real["strings"])
        print(rows, "rows:", end=" ")
        _check_parity(report, image_token_fits=rows > 262_144)
        assert report.same_ids >= report.strings - report.beyond - 4
        assert report.same_text == report.strings - report.beyond


@pytest.mark.slow
@needs_tokenizer
def test_checkpoint_with_tokens_past_the_embedding_exports_and_runs(real):
    """Gemma 3's tokenizer lists <image_soft_token> at 262,144, past a text-only embedding: the GGUF leaves it out
    and llama.cpp runs the model on a chat prompt."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(real[262_144][1]), n_ctx=64, logits_all=True, verbose=False)
    ids = llm.tokenize(b"<start_of_turn>user\nhi  there<end_of_turn>\n<start_of_turn>model\n", special=True)
    assert ids[:3] == [2, 105, 2364]
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids)])
    assert logits.shape == (len(ids), 262_144) and np.isfinite(logits).all()


@pytest.mark.slow
@needs_tokenizer
def test_added_tokens_are_typed_for_llama_cpp(real):
    """The token attributes llama.cpp read from the file, looked up by HF's ids."""
    import llama_cpp
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    A = {"control": llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, "user": llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED,
         "normal": llama_cpp.LLAMA_TOKEN_ATTR_NORMAL, "byte": llama_cpp.LLAMA_TOKEN_ATTR_BYTE,
         "unused": llama_cpp.LLAMA_TOKEN_ATTR_UNUSED}

    def kind(vocab, i):
        return next(k for k, bit in A.items() if vocab.token_get_attr(i) & bit)

    text_only = llama_cpp.Llama(str(real[262_144][1]), vocab_only=True, verbose=False)
    vocab = text_only._model
    assert vocab.n_vocab() == 262_144  # <image_soft_token> (262,144) left out, as llama.cpp's converter does
    for name in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<bos>", "<eos>"):
        assert kind(vocab, hf.token_to_id(name)) == "control", name
    for name in ("<mask>", "[multimodal]", "<unused0>", "<unused6241>", "\n", "\n\n", "\t", "<table>"):
        assert kind(vocab, hf.token_to_id(name)) == "user", name
    assert [kind(vocab, i) for i in range(138, 168)] == ["normal"] * 30  # "▁▁" … decoded to spaces
    assert vocab.token_get_text(138) == SPACE * 2
    assert {kind(vocab, hf.token_to_id(f"<0x{b:02X}>")) for b in range(256)} == {"byte"}
    assert kind(vocab, hf.token_to_id("▁the")) == "normal"
    assert vocab.token_get_score(hf.token_to_id("▁the")) > vocab.token_get_score(hf.token_to_id("▁thermodynamics"))
    assert len(text_only.tokenize(b"<image_soft_token>", add_bos=False, special=True)) > 1  # plain text here

    multimodal = llama_cpp.Llama(str(real[262_208][1]), vocab_only=True, verbose=False)
    vocab = multimodal._model
    assert vocab.n_vocab() == 262_208
    assert vocab.token_get_text(262_144) == "<image_soft_token>" and kind(vocab, 262_144) == "control"
    assert {kind(vocab, i) for i in range(262_145, 262_208)} == {"unused"}
    assert vocab.token_get_text(262_207) == "[PAD262207]"
    assert multimodal.tokenize(b"<image_soft_token>", add_bos=False, special=True) == [262_144]


@pytest.mark.slow
@needs_tokenizer
def test_sentencepiece_proto_for_gemma_cpp_tokenizes_like_hf(real):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from gemma3_qat.vocab import read_sentencepiece_vocab, sentencepiece_model_proto

    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model_proto(read_sentencepiece_vocab(TOKENIZER)))
    hf = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    # SentencePiece never makes <bos> / <eos> / <pad> / <unk> from text (CONTROL and UNKNOWN, as in Google's
    # tokenizer.model; gemma.cpp adds them by id); <image_soft_token> lies past the base vocabulary
    control = ("<image_soft_token>", "<pad>", "<eos>", "<bos>", "<unk>")
    strings = [s for s in real["strings"] if not any(c in s for c in control)]
    differ = [s for s in strings if sp.encode(s) != hf.encode(s, add_special_tokens=False).ids]
    print(f"SentencePiece proto: {len(strings) - len(differ)} of {len(strings)} strings tokenized like HF")
    assert all(SPACE in s for s in differ) and len(differ) <= 4, differ  # the residual named above


@pytest.mark.slow
@needs_tokenizer
def test_gemma_cpp_runs_the_built_tokenizer(real, tmp_path):
    from transformers import AutoTokenizer

    from gemma3_qat.exporters.gemma_cpp import export_gemma_cpp
    from gemma3_qat.runtimes.gemma_cpp import BINARIES, check_tokenizer, default_bin_dir, generate, missing_cpu_flags

    out = tmp_path / "r.sbs"
    export_gemma_cpp(real[262_144][0], out, log=None)
    check_tokenizer(out, AutoTokenizer.from_pretrained(str(real[262_144][0])))  # the embedded blob, via SentencePiece
    if missing_cpu_flags() or any(not (default_bin_dir() / b).is_file() for b in BINARIES):
        pytest.skip("gemma.cpp binaries absent or the CPU lacks x86-64-v3")
    assert generate(out, "<start_of_turn>user\nhi  there<end_of_turn>\n", max_tokens=2)  # gemma.cpp loads it


# ------------------------------------------------------------------------------------------------ bad input


def _nothing_written(directory: Path, before: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == before


@needs_tokenizer
def test_base_vocabulary_larger_than_the_embedding_is_refused(tmp_path):
    from builders import build_random_gemma3
    from gemma3_qat.exporters.gguf import export_gguf

    ckpt = build_random_gemma3(tmp_path / "small", _small(1024))
    with pytest.raises(InputError, match="base vocabulary has 262,144 pieces but the embedding only 1,024 rows") as e:
        export_gguf(ckpt, tmp_path / "x.gguf", log=None)
    assert "\n" not in str(e.value)
    _nothing_written(tmp_path, {"small"})


def test_tokenizer_files_that_disagree_are_refused(tiny_text_dir, tmp_path):
    from gemma3_qat.exporters.gemma_cpp import export_gemma_cpp
    from gemma3_qat.exporters.gguf import export_gguf

    bad = tmp_path / "bad"
    shutil.copytree(tiny_text_dir, bad)
    data = json.loads((bad / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    inv = {i: p for p, i in vocab.items()}
    vocab[inv[300]], vocab[inv[301]] = 301, 300  # two pieces swapped: another tokenizer
    (bad / "tokenizer.json").write_text(json.dumps(data))
    for export in (lambda: export_gguf(bad, tmp_path / "x.gguf", log=None),
                   lambda: export_gemma_cpp(bad, tmp_path / "x.sbs", log=None)):
        with pytest.raises(InputError, match="tokenizer.model and tokenizer.json disagree .id 300 is") as e:
            export()
        assert "\n" not in str(e.value)
    _nothing_written(tmp_path, {"bad"})


def test_checkpoint_without_tokenizer_is_refused(tiny_text_dir, tmp_path):
    from gemma3_qat.exporters.gemma_cpp import export_gemma_cpp
    from gemma3_qat.exporters.gguf import export_gguf

    bare = tmp_path / "bare"
    shutil.copytree(tiny_text_dir, bare)
    (bare / "tokenizer.model").unlink()
    (bare / "tokenizer.json").unlink()
    for export in (lambda: export_gguf(bare, tmp_path / "x.gguf", log=None),
                   lambda: export_gemma_cpp(bare, tmp_path / "x.sbs", log=None)):
        with pytest.raises(MissingFileError, match="neither tokenizer.model nor tokenizer.json") as e:
            export()
        assert "\n" not in str(e.value)
    _nothing_written(tmp_path, {"bare"})


def test_tokenizer_json_alone_gives_the_tokenizer_model_vocabulary(tiny_text_dir, tmp_path):
    """On the fixture tokenizer (trained by SentencePiece, tokenizer.json converted by transformers) the vocabulary
    derived from tokenizer.json alone tokenizes every probe like tokenizer.model and HF do."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from builders import sample_texts
    from gemma3_qat.vocab import read_sentencepiece_vocab, sentencepiece_model_proto

    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_text_dir / name, alone / name)
    both, derived = read_sentencepiece_vocab(tiny_text_dir), read_sentencepiece_vocab(alone)
    assert derived.pieces == both.pieces
    assert derived.types == both.types
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model_proto(derived))
    ref = spm.SentencePieceProcessor(model_file=str(tiny_text_dir / "tokenizer.model"))
    hf = Tokenizer.from_file(str(tiny_text_dir / "tokenizer.json"))
    probes = sample_texts()[:40] + ["  x   y\t\tz\n\n\n", "12345 é 中文", "<start_of_turn>user\nhi<end_of_turn>\n"]
    for s in probes:
        assert sp.encode(s) == ref.encode(s) == hf.encode(s, add_special_tokens=False).ids, s
