"""q4_k_m end to end: llama-quantize's Q4_K_M policy (``gemma3_qat.mixtures``), a QAT run on it, and its GGUF.

* the policy against docs/specs/kquants.md §4's worked table, and the memory model's sizes from it;
* prepare: every module on its own lattice, the tied embedding at the policy's type, qat.json recording them;
* (a) the GGUF exported from a short QAT run, read back with the gguf package's dequantizers, equals the
  fake-quant forward's weights bit for bit, on a model whose rows are multiples of 256 (Q4_K / Q6_K) and on one
  with 640-wide rows (the Q5_0 / Q8_0 fallbacks);
* (b) against llama.cpp (``llama`` marker; skipped without the built tools): ``convert_hf_to_gguf.py --outtype f32``
  of the run directory's latent weights + ``llama-quantize Q4_K_M`` gives every tensor the type we wrote, and
  (c) the same bytes; the latent weights moved onto the lattice first (the ``unquantized`` safetensors export)
  are re-quantized too, and the fraction of blocks llama.cpp reproduces is printed per type (run with ``-s``).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GT
from gguf import GGUFReader, LlamaFileType
from gguf import quants as gq
from transformers import AutoModelForCausalLM

from gemma3_qat.checkpoint import QATMetadata, write_manifest
from gemma3_qat.exporters.gguf import export_gguf
from gemma3_qat.formats import FORMATS, FormatError, get_format
from gemma3_qat.layout import text_gguf_name
from gemma3_qat.mixtures import mixture_lattices, use_more_bits
from gemma3_qat.models import GEMMA3_SHAPES, read_architecture
from gemma3_qat.qat.fake_quant import FakeQuantEmbedding, FakeQuantLinear
from gemma3_qat.qat.prepare import prepare

TYPE_OF = {name: f.gguf_exact[0] for name, f in FORMATS.items() if name in FORMATS["q4_k_m"].lattices}


def type_counts(arch) -> Counter:
    return Counter(TYPE_OF[lattice].name for lattice in mixture_lattices(arch, "q4_k_m").values())


# ------------------------------------------------------------------------------------------------- the policy


def test_use_more_bits_layers_are_the_spec_tables():
    more = {n: [i for i in range(n) if use_more_bits(i, n)] for n in (18, 26, 34, 6)}
    assert more[18] == [0, 1, 4, 7, 10, 13, 15, 16, 17]
    assert more[26] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 22, 23, 24, 25]
    assert more[34] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29, 30, 31, 32, 33]
    assert more[6] == [2, 5]


def test_q4_k_m_policy_is_the_spec_worked_table():
    """docs/specs/kquants.md §4: 270M and 1B fall back on every hidden-wide row (90 and 130 fallbacks), 4B none."""
    lat = mixture_lattices(GEMMA3_SHAPES["270m"], "q4_k_m")
    assert lat["model.embed_tokens.weight"] == "q8_0-lattice"  # 640 % 256 = 128
    assert lat["model.layers.0.self_attn.v_proj.weight"] == "q8_0-lattice"  # in U, Q6_K -> Q8_0
    assert lat["model.layers.2.self_attn.v_proj.weight"] == "q5_0"  # not in U, Q4_K -> Q5_0
    assert lat["model.layers.0.self_attn.o_proj.weight"] == "q4_k"  # ne0 = 1024
    assert lat["model.layers.0.mlp.down_proj.weight"] == "q6_k"  # in U
    assert lat["model.layers.2.mlp.down_proj.weight"] == "q4_k"
    assert type_counts(GEMMA3_SHAPES["270m"]) == {"Q5_0": 81, "Q8_0": 10, "Q6_K": 9, "Q4_K": 27}  # 90 fallbacks
    assert type_counts(GEMMA3_SHAPES["1b"]) == {"Q5_0": 117, "Q8_0": 14, "Q6_K": 13, "Q4_K": 39}  # 130
    four = mixture_lattices(GEMMA3_SHAPES["4b"], "q4_k_m")
    assert four["model.language_model.embed_tokens.weight"] == "q6_k"
    assert type_counts(GEMMA3_SHAPES["4b"]) == {"Q4_K": 34 * 7 - 2 * 17, "Q6_K": 2 * 17 + 1}  # no fallback
    assert not any("vision" in n or "norm" in n for n in four)  # only the text matmuls and the embedding
    with pytest.raises(FormatError, match="'q4_k' is not a mixture"):
        mixture_lattices(GEMMA3_SHAPES["4b"], "q4_k")


def test_memory_prices_q4_k_m_from_the_same_policy():
    from gemma3_qat.memory import stored_tensors, weight_bytes
    from gemma3_qat.memory.weights import WeightOptions

    lat = mixture_lattices(GEMMA3_SHAPES["270m"], "q4_k_m")
    rows = {t.hf_name: t for t in stored_tensors("270m", WeightOptions("q4_k_m"))}
    for name, lattice in lat.items():
        ggml = TYPE_OF[lattice]
        block, size = GGML_QUANT_SIZES[ggml]
        assert (rows[name].type, rows[name].nbytes) == (ggml.name, int(np.prod(rows[name].shape)) // block * size)
    w = weight_bytes("270m", format="q4_k_m")
    assert w.by_group["embedding"] == 262_144 * 640 // 32 * 34 and w.embedding == "quantized"
    assert 0.24e9 < w.total < 0.25e9
    with pytest.raises(ValueError, match="embedding takes its policy's type"):
        WeightOptions("q4_k_m", embedding="f16")


# ------------------------------------------------------------------------------------------------- models, runs


@pytest.fixture(scope="module")
def kq256_dir(tmp_path_factory, tokenizer_dir):
    """Every row a multiple of 256 (hidden 256, ffn 512, 4 x 64 heads): Q4_K, and Q6_K in layers 2 and 5."""
    from builders import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("kq256"), tokenizer_dir, hidden=256, ffn=512, heads=4,
                                 head_dim=64, layers=6, seed=3)


@pytest.fixture(scope="module")
def kq640_dir(tmp_path_factory, tokenizer_dir):
    """640-wide rows (270M's hidden) with 256-wide attn_output and 1024-wide ffn_down: all four types."""
    from builders import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("kq640"), tokenizer_dir, hidden=640, ffn=1024, heads=4,
                                 head_dim=64, layers=6, seed=4)


@pytest.fixture(params=[256, 640], ids=["rows-256", "rows-640"])
def kq_dir(request):
    return request.getfixturevalue(f"kq{request.param}_dir")


def test_prepare_puts_each_module_on_its_policy_lattice(kq640_dir):
    model = AutoModelForCausalLM.from_pretrained(kq640_dir, dtype=torch.float32).eval()
    report = prepare(model, "q4_k_m")  # quantize_embeddings not asked: a mixture always trains the embedding
    want = mixture_lattices(read_architecture(kq640_dir / "config.json"), "q4_k_m")
    assert report.lattices == want and report.config.quantize_embeddings
    assert set(type_counts(read_architecture(kq640_dir / "config.json"))) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    for name, module in model.named_modules():
        if isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)) and name != "lm_head":
            assert module.weight_fake_quant.format.name == want[name + ".weight"], name
    assert model.lm_head.weight_fake_quant is model.model.embed_tokens.weight_fake_quant  # tied: one quantizer
    ids = torch.randint(9, 500, (1, 16))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        ref = AutoModelForCausalLM.from_pretrained(kq640_dir, dtype=torch.float32).eval()
        for name, param in ref.named_parameters():
            if name in want:
                param.copy_(get_format(want[name]).fake_quantize_values(param))
        torch.testing.assert_close(got, ref(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_a_single_k_quant_format_refuses_rows_that_fall_back_before_training(kq640_dir, sample_data, tmp_path):
    """--format q4_k on 640-wide rows: one line, before the first step, naming a tensor, the count and q4_k_m."""
    from gemma3_qat.qat.train import TrainConfig, train

    config = TrainConfig(model=str(kq640_dir), format="q4_k", data=[str(sample_data / "text.jsonl")], seq_len=64,
                         batch_size=2, micro_batch_size=2, steps=2, mixed_precision="no", output=str(tmp_path / "r"))
    with pytest.raises(FormatError) as e:
        train(config, log=lambda *_: None)
    message = str(e.value)
    assert "\n" not in message and "q4_k needs rows that are a multiple of 256" in message
    assert "(30 of the 42 matmuls have such rows)" in message and "--format q4_k_m" in message
    assert not list((tmp_path / "r").glob("**/qat.json"))


def test_a_single_lattice_checkpoint_records_and_exports_its_type(kq256_dir, tmp_path):
    """--format q4_k on rows that fit: every matmul Q4_K, the embedding (not trained) Q8_0; qat.json records each
    tensor's lattice from the prepared model; the memory model predicts the file."""
    from gemma3_qat.checkpoint import write_qat_checkpoint
    from gemma3_qat.memory import measure_gguf

    model = AutoModelForCausalLM.from_pretrained(kq256_dir, dtype=torch.float32)
    report = prepare(model, "q4_k")
    out = tmp_path / "ckpt"
    out.mkdir()
    write_qat_checkpoint(model, out, QATMetadata("q4_k", False, report.quantized), kq256_dir)
    lattices = QATMetadata.read(out / "qat.json").lattices
    assert len(lattices) == 42 and set(lattices.values()) == {"q4_k"} and "model.embed_tokens.weight" not in lattices
    plan = export_gguf(out, tmp_path / "m.gguf", log=None)
    assert plan.file_type == LlamaFileType.MOSTLY_Q4_K_S
    types = Counter(t.ggml_type.name for t in plan.tensors)
    assert types == {"Q4_K": 42, "Q8_0": 1, "F32": 6 * 6 + 1}
    assert measure_gguf(tmp_path / "m.gguf").exact


def tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def values(t) -> np.ndarray:
    data = np.asarray(t.data)
    out = data.astype(np.float32) if t.tensor_type in (GT.F32, GT.F16) else gq.dequantize(data, t.tensor_type)
    return out.reshape([int(x) for x in t.shape[::-1]])


@pytest.mark.slow
def test_gguf_read_back_equals_the_fake_quant_forward_bit_for_bit(qat_run, kq_dir, tmp_path):
    run = qat_run(kq_dir, "q4_k_m", steps=2, mixed_precision="no")
    meta = QATMetadata.read(run / "qat.json")
    want = mixture_lattices(read_architecture(run / "config.json"), "q4_k_m")
    assert meta.format == "q4_k_m" and meta.quantize_embeddings and meta.lattices == want
    model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    prepare(model, meta.format, lattices=meta.lattices)  # as eval loads it
    plan = export_gguf(run, tmp_path / "m.gguf", log=None)
    assert plan.file_type == LlamaFileType.MOSTLY_Q4_K_M
    ts = tensors(tmp_path / "m.gguf")
    seen = Counter()
    for name, module in model.named_modules():
        if not isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)) or name == "lm_head":
            continue
        t = ts[text_gguf_name(name + ".weight")]
        assert t.tensor_type == TYPE_OF[want[name + ".weight"]], name
        forward = module.weight_fake_quant.quantized_values(module.weight).numpy()  # what training multiplied by
        np.testing.assert_array_equal(values(t).view(np.uint32), forward.view(np.uint32), err_msg=name)
        seen[t.tensor_type.name] += 1
    assert sum(seen.values()) == len(want) == 43
    assert all(ts[n].tensor_type == GT.F32 for n in ts if n.endswith("norm.weight"))
    # eval applies the same lattices: its logits are the trained model's
    from gemma3_qat.evaluate import load_for_eval

    ids = torch.randint(9, 500, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_for_eval(run)(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)


@pytest.mark.slow
def test_an_older_qat_json_without_lattices_exports_the_same_file(qat_run, kq640_dir, tmp_path):
    """qat.json written before ``lattices`` existed: a mixture's come from its policy, a single format's from its
    name; the files are the same."""
    for fmt in ("q4_k_m", "int4-block"):
        run = tmp_path / fmt
        shutil.copytree(qat_run(kq640_dir, fmt, steps=2, mixed_precision="no"), run)
        new = export_gguf(run, tmp_path / f"{fmt}-new.gguf", log=None)
        meta = json.loads((run / "qat.json").read_text())
        assert meta.pop("lattices")
        (run / "qat.json").write_text(json.dumps(meta))
        write_manifest(run)
        old = export_gguf(run, tmp_path / f"{fmt}-old.gguf", log=None)
        a, b = tensors(new.path), tensors(old.path)
        assert {n: (t.tensor_type, np.asarray(t.data).tobytes()) for n, t in a.items()} == \
               {n: (t.tensor_type, np.asarray(t.data).tobytes()) for n, t in b.items()}, fmt


@pytest.mark.slow
def test_other_targets_refuse_a_mixture_in_one_line_and_unquantized_holds_its_values(qat_run, kq256_dir, tmp_path):
    from gemma3_qat.errors import InputError
    from gemma3_qat.exporters import export
    from safetensors.torch import load_file

    run = qat_run(kq256_dir, "q4_k_m", steps=2, mixed_precision="no")
    for to, options in (("gemma-cpp", {}), ("safetensors", {"layout": "compressed-tensors"})):
        with pytest.raises(InputError) as e:
            export(run, to, tmp_path / to, log=None, **options)
        assert "\n" not in str(e.value) and "q4_k_m" in str(e.value), to
    plan = export(run, "safetensors", tmp_path / "unquantized", log=None, layout="unquantized")
    state = load_file(str(plan.path / "model.safetensors"))
    latent = load_file(str(run / "model.safetensors"))
    for name, lattice in QATMetadata.read(run / "qat.json").lattices.items():
        assert torch.equal(state[name], get_format(lattice).fake_quantize_values(latent[name])), name


# ------------------------------------------------------------------------------------------------- llama.cpp


def _blocks(t) -> np.ndarray:
    return np.asarray(t.data).reshape(-1, GGML_QUANT_SIZES[t.tensor_type][1])


def _byte_fractions(ours: dict, theirs: dict) -> dict[str, tuple[int, int, int, int]]:
    """Per type: (tensors equal, tensors, blocks equal, blocks) of llama.cpp's file against ours."""
    out: dict[str, list[int]] = {}
    for name, t in ours.items():
        if t.tensor_type == GT.F32:
            continue
        a, b = _blocks(t), _blocks(theirs[name])
        same = (a == b).all(axis=1) if a.shape == b.shape else np.zeros(len(a), bool)
        row = out.setdefault(t.tensor_type.name, [0, 0, 0, 0])
        row[0] += bool(same.all())
        row[1] += 1
        row[2] += int(same.sum())
        row[3] += len(same)
    return {k: tuple(v) for k, v in out.items()}


def _say(what: str, fractions: dict) -> None:
    print(f"\n{what}: " + "; ".join(f"{k} {t}/{n} tensors, {b}/{m} blocks ({100 * b / m:.2f}%)"
                                     for k, (t, n, b, m) in sorted(fractions.items())))


@pytest.mark.llama
@pytest.mark.slow
def test_llama_quantize_q4_k_m_of_the_latent_weights_writes_our_file(qat_run, kq_dir, tmp_path):
    from gemma3_qat.exporters.safetensors import export_safetensors
    from gemma3_qat.memory import measure_gguf
    from gemma3_qat.runtimes import llama_tools

    if not llama_tools.available():
        pytest.skip("llama.cpp's tools are not built (scripts/build_llama_tools.sh)")
    run = qat_run(kq_dir, "q4_k_m", steps=2, mixed_precision="no")
    ours = tensors(export_gguf(run, tmp_path / "ours.gguf", log=None).path)
    # (b) llama.cpp's own convert + quantize of the run directory's latent fp32 weights: every type is ours
    f32 = llama_tools.convert_hf(run, tmp_path / "latent-f32.gguf", outtype="f32")
    theirs_path = llama_tools.quantize(f32, tmp_path / "llama-q4_k_m.gguf", "Q4_K_M")
    theirs = tensors(theirs_path)
    assert ours.keys() == theirs.keys()
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in theirs.items()}
    assert GGUFReader(str(theirs_path)).fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q4_K_M
    assert measure_gguf(theirs_path).exact  # the memory model predicts llama-quantize's file tensor by tensor
    # (c) and every byte: ggml's reference quantizers are deterministic functions of the latent weights
    label = f"{read_architecture(run / 'config.json').hidden}-wide rows"
    latent = _byte_fractions(ours, theirs)
    _say(f"{label}: llama-quantize Q4_K_M of the latent weights reproduces", latent)
    assert all(t == n for t, n, _, _ in latent.values()), latent
    # the latent weights moved onto the lattice first (= the unquantized export): re-quantizing the lattice's own
    # values is another question, which Q5_0 and Q8_0 answer exactly and Q4_K / Q6_K's searches mostly
    plain = export_safetensors(run, tmp_path / "on-lattice", dtype="f32", log=None)
    on_f32 = llama_tools.convert_hf(plain.path, tmp_path / "on-lattice-f32.gguf", outtype="f32")
    again = tensors(llama_tools.quantize(on_f32, tmp_path / "on-lattice-q4_k_m.gguf", "Q4_K_M"))
    on_lattice = _byte_fractions(ours, again)
    _say(f"{label}: llama-quantize Q4_K_M of the on-lattice values reproduces", on_lattice)
    values_equal = Counter(t.tensor_type.name for n, t in ours.items()
                           if t.tensor_type != GT.F32 and np.array_equal(values(t), values(again[n])))
    print(f"{label}: tensors whose dequantized values llama.cpp reproduces from the on-lattice values: "
          + ", ".join(f"{k} {values_equal[k]}/{on_lattice[k][1]}" for k in sorted(on_lattice)))
    for exact in ("Q5_0", "Q8_0"):
        if exact in on_lattice:
            assert on_lattice[exact][2] == on_lattice[exact][3], (exact, on_lattice[exact])
    assert {n: t.tensor_type for n, t in again.items()} == {n: t.tensor_type for n, t in ours.items()}
