"""The embedded default model: shipped, genuinely trained, sensitive to quantization."""

import json
import subprocess
import sys
import zipfile

import pytest

from gemma3_qat.assets import default_model_path, sample_data_files, validation_documents


@pytest.fixture(scope="module")
def model_dir():
    return default_model_path()


def test_assets_are_complete_and_small(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "MODEL_CARD.md", "data/stdlib-manifest.json", "data/validation.jsonl.gz"):
        assert (model_dir / name).exists(), name
    assert (model_dir / "model.safetensors").stat().st_size <= 10 * 2**20
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config["query_pre_attn_scalar"] == config["head_dim"]
    assert config["sliding_window"] < 256  # smaller than the training length: exercised
    assert config["hidden_size"] % 32 == 0 and config["intermediate_size"] % 32 == 0
    rope = config["rope_parameters"]
    assert rope["full_attention"]["rope_theta"] == 1e6 and rope["sliding_attention"]["rope_theta"] == 1e4
    manifest = json.loads((model_dir / "data" / "stdlib-manifest.json").read_text())
    assert {f["split"] for f in manifest["files"]} == {"train", "validation"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert len(validation_documents()) == sum(f["split"] == "validation" for f in manifest["files"])
    texts = [json.loads(line) for line in sample_data_files()[0].read_text().splitlines()]
    chats = [json.loads(line) for line in sample_data_files()[1].read_text().splitlines()]
    assert texts and all("text" in t for t in texts)
    assert chats and all(m["role"] in ("user", "assistant") for c in chats for m in c["messages"])


def test_trained_better_than_unigram_and_generates_code(model_dir):
    results = json.loads((model_dir / "pretrain-results.json").read_text())
    print(f"validation perplexity {results['validation_perplexity']:.2f} vs unigram "
          f"{results['unigram_validation_perplexity']:.2f}")
    assert results["validation_perplexity"] < 0.25 * results["unigram_validation_perplexity"]
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert f"{results['validation_perplexity']:.2f}" in card and "pretrain-default" in card
    completion = results["greedy_completion"]
    assert any(kw in completion for kw in ("return", "open(", "self", "if ", "with ")), completion


def test_quantization_measurably_hurts_the_teacher(model_dir):
    from gemma3_qat.embedded.pretrain import ptq_sensitivity

    sens = ptq_sensitivity(model_dir, windows=64)  # the model card's windows
    for fmt, row in sens.items():
        print(f"{fmt:<13} ppl {row['perplexity']:.3f}  KL {row['kl']:.5f}")
    teacher = sens["teacher"]["perplexity"]
    for fmt in ("int4-block", "int4-channel"):  # measured on 64 windows: +0.9% / +1.5% perplexity, KL 0.014 / 0.023
        assert sens[fmt]["perplexity"] > 1.004 * teacher, fmt
        assert sens[fmt]["kl"] > 5e-3, fmt
    assert sens["int4-channel"]["kl"] > sens["int4-block"]["kl"]  # one scale per row is the coarser grid
    assert sens["sfp8"]["kl"] < sens["int4-block"]["kl"]


@pytest.mark.slow
def test_wheel_ships_the_assets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), "."], check=True, capture_output=True)
    wheel = next(tmp_path.glob("gemma3_qat-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("gemma3_qat/assets/default-model/model.safetensors",
                   "gemma3_qat/assets/default-model/tokenizer.model",
                   "gemma3_qat/assets/default-model/data/validation.jsonl.gz",
                   "gemma3_qat/assets/default-model/data/sample-chat.jsonl",
                   "gemma3_qat/assets/recipes/default.yaml",
                   "gemma3_qat/assets/recipes/gemma3-1b-int4-block.yaml"):
        assert needed in names, needed


def test_default_recipe_ships_with_the_package():
    from pathlib import Path

    import gemma3_qat

    shipped = Path(gemma3_qat.__file__).parent / "assets" / "recipes"
    repo = Path(__file__).resolve().parents[1] / "recipes"
    assert repo.is_symlink() and repo.resolve() == shipped.resolve() and (shipped / "default.yaml").exists()
