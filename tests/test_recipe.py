"""Recipes: defaults + file + overrides, validated; every mistake is one line naming the key and the fix."""

import pytest
import yaml
from cli_runner import assert_one_line_error, run_cli

from sharelora_cli.config.recipe import AdapterConfig, ModelConfig, Recipe, load_recipe, shipped_recipes
from sharelora_cli.core.errors import UserError
from sharelora_cli.core.paths import RECIPES_DIR


@pytest.fixture
def write_recipe(tmp_path):
    """Writes a recipe; a mapping without a model gets one (every recipe must name its model) unless model=False."""

    def write(text: str, name: str = "recipe.yaml", model: bool = True):
        path = tmp_path / name
        try:
            document = yaml.safe_load(text) if model else None
        except yaml.YAMLError:
            document = None
        if isinstance(document, dict) and "model" not in document:
            text = "model: {name_or_path: llama-7b}\n" + ("" if document == {} else text)
        path.write_text(text)
        return str(path)

    return write


def recipe_error(path: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as caught:
        load_recipe(path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_file_and_overrides_merge_over_schema_defaults(write_recipe):
    path = write_recipe("adapter:\n  method: shareb\n  rank: 4\ntrain:\n  lr: 1e-4\n")
    recipe = load_recipe(path, ["adapter.rank=16", "adapter.targets=[q_proj,k_proj]", "train.max_steps=7"])
    assert (recipe.adapter.method, recipe.adapter.rank, recipe.adapter.targets) == ("shareb", 16, ["q_proj", "k_proj"])
    assert (recipe.train.lr, recipe.train.max_steps) == (1e-4, 7)
    assert recipe.adapter.alpha == AdapterConfig().alpha and recipe.model == ModelConfig(name_or_path="llama-7b")


def test_unknown_key_names_it_and_the_allowed_keys(write_recipe):
    message = recipe_error(write_recipe("adapter:\n  rnak: 4\n"))
    assert "unknown key 'adapter.rnak'" in message
    assert all(key in message for key in AdapterConfig.model_fields)


def test_wrong_type_names_the_key_and_value(write_recipe):
    message = recipe_error(write_recipe("adapter:\n  rank: four\n"))
    assert "adapter.rank" in message and "'four'" in message


def test_bad_literal_lists_allowed_values(write_recipe):
    message = recipe_error(write_recipe("adapter:\n  method: lorax\n"))
    assert "adapter.method must be one of" in message and "'lorax'" in message
    assert all(method in message for method in ("lora", "sharea", "shareb", "shareab", "miss"))


@pytest.mark.parametrize("rank", ["-3", "0"])
def test_non_positive_rank_is_rejected(write_recipe, rank):
    path = write_recipe(f"adapter:\n  rank: {rank}\n")
    message = recipe_error(path)
    assert message.startswith(f"{path}: adapter.rank") and rank in message


def test_missing_recipe_names_it_and_the_shipped_ones(tmp_path):
    message = recipe_error(str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in message and "not found" in message
    assert all(name in message for name in shipped_recipes())


@pytest.mark.parametrize("override", ["adapter.rank", "=16"])
def test_override_without_key_value_shape_is_rejected(write_recipe, override):
    message = recipe_error(write_recipe("{}\n"), [override])
    assert f"override '{override}' must look like key=value" in message


def test_override_with_unknown_key_is_rejected(write_recipe):
    assert "unknown key 'adapter.bogus'" in recipe_error(write_recipe("{}\n"), ["adapter.bogus=1"])


def test_invalid_yaml_in_an_override_blames_the_override(write_recipe):
    assert recipe_error(write_recipe("{}\n"), ["adapter.targets=[q_proj"]).startswith("overrides: invalid YAML")


def test_invalid_yaml_names_the_file_and_line(write_recipe):
    path = write_recipe("adapter:\n  rank: 4\n  targets: [q_proj\n")
    message = recipe_error(path)
    assert message.startswith(f"recipe {path}: invalid YAML") and "line" in message


def test_recipe_that_is_not_a_mapping_is_rejected(write_recipe):
    message = recipe_error(write_recipe("- adapter\n- train\n"))
    assert "expected a mapping of sections" in message


def test_section_that_is_not_a_mapping_is_rejected(write_recipe):
    path = write_recipe("adapter: 5\n")
    assert recipe_error(path).startswith(f"{path}: adapter: ")


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipe_validates(name):
    assert isinstance(load_recipe(name), Recipe)


def test_recipes_command_lists_every_shipped_recipe():
    result = run_cli("recipes")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert listed == {path.stem: str(path) for path in RECIPES_DIR.glob("*.yaml")}


def test_show_prints_resolved_recipe_with_override(write_recipe):
    path = write_recipe("adapter:\n  method: miss\n  rank: 4\n")
    result = run_cli("show", path, "adapter.rank=16")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert (shown["adapter"]["method"], shown["adapter"]["rank"]) == ("miss", 16)
    # The printed YAML is complete: loading it again gives the same recipe.
    assert load_recipe(write_recipe(result.stdout, "shown.yaml")) == load_recipe(path, ["adapter.rank=16"])


def test_show_with_unknown_key_exits_2_with_one_line(write_recipe):
    result = run_cli("show", write_recipe("train:\n  max_stpes: 5\n"))
    assert_one_line_error(result, "unknown key 'train.max_stpes'", "max_steps")


def test_show_with_bad_override_exits_2_with_one_line(write_recipe):
    assert_one_line_error(run_cli("show", write_recipe("{}\n"), "adapter.rank"), "override 'adapter.rank'")


# YAML 1.1 reads yes/no/on/off/true/false (three spellings each) as booleans and null/~ as null; a field that takes a string
# gets the word itself unless it also takes that boolean or null.
WORDS = [
    ("train.mixed_precision", "no", "no"),
    ("data.split", "off", "off"),
    ("data.split", "null", "null"),
    ("model.name_or_path", "Yes", "Yes"),
    ("model.revision", "on", "on"),
    ("model.revision", "null", None),
    ("eval.adapter", "~", None),
    ("adapter.targets", "[q_proj, on, NO, y]", ["q_proj", "on", "NO", "y"]),
    ("data.packing", "yes", True),
    ("train.gradient_checkpointing", "off", False),
    ("quantization.double_quant", "NO", False),
    ("eval.batch_size", "8", 8),
]


def value_at(recipe: Recipe, key: str):
    value = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("key, text, expected", WORDS)
def test_yaml_words_are_strings_where_the_schema_wants_a_string_in_overrides(write_recipe, key, text, expected):
    assert value_at(load_recipe(write_recipe("{}\n"), [f"{key}={text}"]), key) == expected


@pytest.mark.parametrize("key, text, expected", WORDS)
def test_yaml_words_are_strings_where_the_schema_wants_a_string_in_files(write_recipe, key, text, expected):
    section, name = key.split(".")
    path = write_recipe(f"{section}:\n  {name}: {text}\n", model=False)
    model = [] if key == "model.name_or_path" else ["model.name_or_path=llama-7b"]
    assert value_at(load_recipe(path, model), key) == expected


def test_a_word_that_is_not_an_allowed_value_is_reported_as_typed(write_recipe):
    message = recipe_error(write_recipe("{}\n"), ["train.mixed_precision=on"])
    assert "train.mixed_precision must be one of" in message and "'on'" in message


def test_show_prints_words_so_that_they_load_back_the_same(write_recipe):
    path = write_recipe("{}\n")
    result = run_cli("show", path, "train.mixed_precision=no", "data.split=off")
    assert result.returncode == 0, result.stderr
    assert load_recipe(write_recipe(result.stdout, "shown.yaml")) == load_recipe(
        path, ["train.mixed_precision=no", "data.split=off"]
    )
