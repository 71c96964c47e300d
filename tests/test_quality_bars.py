"""benchmarks/quality.py's verdict on files of a size (issue 17's bar): which PTQ files a QAT file is held
against, and when it holds."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402


def row(name, bits, kl):
    return SimpleNamespace(name=name, bits=[bits, bits + 1.2], kl_mean=kl)


def test_size_verdict_holds_and_misses():
    qat = row("qat.gguf", 4.5, 0.005)
    ptq = [row("q4_0.gguf", 4.5, 0.014), row("iq4_nl.gguf", 4.53, 0.0086), row("q4_k_m.gguf", 4.68, 0.0091),
           row("q5_0-fallback.gguf", 5.5, 0.001)]
    text = quality.size_verdict(qat, ptq)
    # the closest file of its size is IQ4_NL (within 2% of the whole-file bits), 0.58x; Q4_K_M is within 10% and has more KL;
    # the 6.7-bit file is too big to be a peer and is only named
    assert "0.58x the KL of iq4_nl.gguf" in text and "bar 0.6x: holds" in text
    assert "1 PTQ file up to 10% bigger: none has less KL (holds)" in text
    assert "not compared: q5_0-fallback.gguf 6.70" in text and "MISSED" not in text
    worse = quality.size_verdict(row("qat.gguf", 4.5, 0.0095), ptq)
    assert "1.10x the KL of iq4_nl.gguf" in worse and "bar 0.6x: MISSED" in worse
    assert "MISSED, lower KL in q4_k_m.gguf" in worse


def test_size_verdict_compares_whole_files():
    """Peers by the whole file's bits: at 270M an all-Q4_0 file and one with a Q8_0 embedding have the same matmul
    bits, and the second is half as big again, so it is only named."""
    qat = SimpleNamespace(name="qat.gguf", bits=[4.5, 4.7], kl_mean=0.23)
    ptq = [SimpleNamespace(name="imatrix-e4.gguf", bits=[4.5, 4.7], kl_mean=0.34),
           SimpleNamespace(name="iq4_nl.gguf", bits=[4.5, 7.2], kl_mean=0.09)]
    text = quality.size_verdict(qat, ptq)
    assert "0.68x the KL of imatrix-e4.gguf" in text and "not compared: iq4_nl.gguf 7.20" in text


def test_recipe_sweep_data_variants():
    """``--set data=...``: ``default`` is the embedded sample data (an empty list), ``+`` joins the sources of one
    variant, and the run names stay short and distinct."""
    import recipe_sweep

    got = recipe_sweep.variants(["data=default,/x/teacher.jsonl,/x/teacher.jsonl:0.5+/y/text.jsonl:0.5",
                                 "lr=5e-5"])
    assert got == [{"data": [], "lr": 5e-5}, {"data": ["/x/teacher.jsonl"], "lr": 5e-5},
                   {"data": ["/x/teacher.jsonl:0.5", "/y/text.jsonl:0.5"], "lr": 5e-5}]
    names = [recipe_sweep.run_name(v, 0) for v in got]
    assert names[0] == "data=default-lr=5e-05-seed0"
    assert names[2] == "data=teacher.jsonl:0.5+text.jsonl:0.5-lr=5e-05-seed0" and len(set(names)) == 3


def test_which_llama_cpp_files_are_built():
    """The all-Q4_0 (``-e4``) files stand beside an int4-block run only where its recipe trains the embedding on the
    grid; ``--ptq`` names the files outright (a teacher on a llama.cpp lattice leaves its own types out)."""
    names = lambda files: [f[0] for f in files]  # noqa: E731
    recipes = quality.RECIPE.parent
    default = names(quality.wanted_ptq_files(["int4-block"], recipes / "default.yaml"))  # embedding stays Q8_0
    assert "llama-q4_0.gguf" in default and not any(n.endswith("-e4.gguf") for n in default)
    cpu = names(quality.wanted_ptq_files(["int4-block"], recipes / "gemma3-270m-cpu.yaml"))
    assert {"llama-q4_0-e4.gguf", "llama-imatrix-q4_0-e4.gguf"} <= set(cpu)
    k_m = names(quality.wanted_ptq_files(["q4_k_m"], recipes / "gemma3-270m-cpu.yaml"))
    assert k_m == ["llama-q4_k_m.gguf", "llama-imatrix-q4_k_m.gguf"]
    chosen = quality.wanted_ptq_files(["int4-block"], recipes / "default.yaml", ["llama-q4_0", "llama-imatrix-q4_0-e4"])
    assert names(chosen) == ["llama-q4_0.gguf", "llama-imatrix-q4_0-e4.gguf"]
    assert [f[3] for f in chosen] == ["q8_0", "q4_0"]  # the token-embedding type llama-quantize is given
