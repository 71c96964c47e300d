"""Which recipe a run uses, and reading one.

The recipes ship with the package (``gemma3_qat/assets/recipes/``; ``recipes/`` in the repository links there),
so an installed ``gemma3-qat`` finds them by name: ``--recipe gemma3-1b-int4-block`` is
``recipes/gemma3-1b-int4-block.yaml``. The rule when ``--recipe`` is not given:

* no ``--model``: ``default.yaml``, the recipe tuned on the embedded default model (what ``make demo`` runs);
* a ``--model`` with one of the released shapes (``models.GEMMA3_SHAPES``: 270m, 1b, 4b, 12b, 27b; a fine-tune
  keeps its base's shape): that size's recipe for the run's format, ``gemma3-<size>-<format>.yaml``;
* any other Gemma 3 (a small model of your own): ``default.yaml`` too, with your model in place of the embedded one.

Nothing falls through to the ``TrainConfig`` dataclass defaults: every run uses a recipe some measurement chose,
and the log says which and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from gemma3_qat.errors import InputError, MissingFileError

RECIPES = Path(__file__).resolve().parents[1] / "assets" / "recipes"
DEFAULT_RECIPE = RECIPES / "default.yaml"
DEFAULT_FORMAT = "int4-block"  # TrainConfig's; the per-size recipe of a run that names no format


@dataclass(frozen=True)
class RecipeChoice:
    path: Path
    why: str  # for the log: "recipes/gemma3-1b-int4-block.yaml (google/gemma-3-1b-pt has the 1b shape)"

    def __fspath__(self) -> str:
        return str(self.path)


def recipe_path(recipe: str | Path) -> Path:
    """A recipe file, or the name of a shipped one (``gemma3-1b-int4-block``, with or without ``.yaml``)."""
    path = Path(recipe).expanduser()
    if path.exists():
        return path
    shipped = RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent in (Path("."), Path("recipes")) and shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise MissingFileError(f"recipe {recipe} does not exist; give a YAML file or one of the shipped recipes: {names}")


def load_recipe(path: Path) -> dict:
    """A recipe's values; ``base: other.yaml`` inherits (relative to the recipe's directory)."""
    path = recipe_path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"recipe {path}{where} is not valid YAML ({getattr(e, 'problem', None) or e}); fix it") \
            from None
    if not isinstance(values, dict):
        raise InputError(f"recipe {path} is not a mapping of keys to values (got {type(values).__name__})")
    base = values.pop("base", None)
    if base:
        values = {**load_recipe(path.parent / base), **values}
    return values


def released_size(model: str) -> str | None:
    """The released size whose shape ``model`` (a local checkpoint, a ``.gguf`` or a hub id) has, or None. Reads
    only the config (a hub id: its config.json, as the training run would; a ``.gguf``: its cached conversion)."""
    from gemma3_qat import models, sources

    arch = sources.source_architecture(model)
    key = (arch.layers, arch.hidden, arch.ffn, arch.heads, arch.kv_heads, arch.head_dim)
    for name, shape in models.GEMMA3_SHAPES.items():
        if key == (shape.layers, shape.hidden, shape.ffn, shape.heads, shape.kv_heads, shape.head_dim):
            return name
    return None


def resolve_recipe(recipe: str | Path | None, model: str | None, fmt: str | None = None) -> RecipeChoice:
    """The recipe of a ``train`` or ``teacher-cache`` run (the rule in the module docstring)."""
    if recipe is not None:
        return RecipeChoice(recipe_path(recipe), f"{recipe} (given)")
    if model is None:
        return RecipeChoice(DEFAULT_RECIPE, "default.yaml (the embedded default model's tuned recipe)")
    size = released_size(model)
    fmt = fmt or DEFAULT_FORMAT
    if size is not None:
        path = RECIPES / f"gemma3-{size}-{fmt}.yaml"
        if path.exists():
            return RecipeChoice(path, f"gemma3-{size}-{fmt}.yaml ({model} has the released {size} shape; "
                                      "--recipe picks another)")
    return RecipeChoice(DEFAULT_RECIPE, f"default.yaml ({model} is not one of the released sizes: the recipe tuned "
                                        "on the embedded model, with this model and your --data; --recipe picks "
                                        "another)")
