"""Every recipe loads into a valid TrainConfig; every accelerate config parses with accelerate's own loader."""

from pathlib import Path

import pytest

from gemma3_qat.formats import FORMATS, Lattice
from gemma3_qat.models import GEMMA3_SHAPES
from gemma3_qat.qat.train import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# a recipe per released size for every format a release is trained in: the three and the q4_k_m mixture; the single
# llama.cpp lattices (q4_k, q6_k, q5_0, q8_0-lattice) are q4_k_m's parts (q4_k cannot hold 270M's or 1B's rows)
RELEASE_FORMATS = [name for name, f in FORMATS.items() if not isinstance(f, Lattice)]


@pytest.mark.parametrize("size", list(GEMMA3_SHAPES))
@pytest.mark.parametrize("fmt", RELEASE_FORMATS)
def test_size_format_recipes(size, fmt):
    path = RECIPES / f"gemma3-{size}-{fmt}.yaml"
    config = TrainConfig.from_recipe(path)
    assert config.format == fmt and config.steps == 5000
    assert config.model == f"google/gemma-3-{size}" + ("" if size == "270m" else "-pt")  # 270m has no -pt
    assert config.batch_size % config.micro_batch_size == 0
    assert config.seq_len <= GEMMA3_SHAPES[size].context
    assert "Hardware assumed" in (RECIPES / f"gemma3-{size}.yaml").read_text()
    assert TrainConfig.from_recipe(path, steps=10, lr=1e-4).steps == 10  # flags override the recipe


def test_default_and_pretrain_recipes_load():
    assert TrainConfig.from_recipe(RECIPES / "default.yaml", format="sfp8").model is None
    from gemma3_qat.embedded.pretrain import PretrainRecipe

    recipe = PretrainRecipe.load(RECIPES / "default-pretrain.yaml")
    assert recipe.sliding_window < recipe.seq_len and recipe.hidden % 32 == 0 and recipe.ffn % 32 == 0


def test_a_recipe_value_can_depend_on_the_format(tmp_path):
    (tmp_path / "r.yaml").write_text("lr: {int4-block: 1.0e-4, sfp8: 3.0e-5}\nsteps: 7\n")
    assert TrainConfig.from_recipe(tmp_path / "r.yaml").lr == 1e-4  # the default format
    assert TrainConfig.from_recipe(tmp_path / "r.yaml", format="sfp8").lr == 3e-5
    assert TrainConfig.from_recipe(tmp_path / "r.yaml", format="sfp8", lr=2e-5).lr == 2e-5  # a flag still wins
    with pytest.raises(ValueError, match="not for format 'int4-channel': add one, or pass --lr"):
        TrainConfig.from_recipe(tmp_path / "r.yaml", format="int4-channel")
    default = {f: TrainConfig.from_recipe(RECIPES / "default.yaml", format=f) for f in FORMATS}
    assert all(isinstance(c.lr, float) for c in default.values())


def test_unknown_recipe_key_is_named(tmp_path):
    (tmp_path / "r.yaml").write_text("format: int4-block\nlearning_rate: 1e-5\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['learning_rate'\]"):
        TrainConfig.from_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16"  # never fp16: Gemma 3 activations overflow
    if "fsdp" in path.name:
        assert config.distributed_type == "FSDP"
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Gemma3DecoderLayer"
        assert config.num_processes == int(path.name.split("-")[1].removesuffix("gpu.yaml"))
