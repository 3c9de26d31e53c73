"""A wheel carries every shipped recipe and model config (pyproject.toml's data-files)."""

import pytest

from sharelora_cli.core.paths import PROJECT_ROOT

tomllib = pytest.importorskip("tomllib")


def test_data_files_ship_every_recipe_and_model_config():
    data_files = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {
        path
        for target, patterns in data_files.items()
        for pattern in patterns
        for path in PROJECT_ROOT.glob(pattern)
        if target == "share/sharelora/" + str(path.parent.relative_to(PROJECT_ROOT))
    }
    recipes = PROJECT_ROOT / "recipes"
    expected = set(recipes.glob("*.yaml")) | set((recipes / "accelerate").glob("*.yaml"))
    expected |= {path for path in (recipes / "models").glob("*/*") if path.is_file()}
    assert expected and shipped == expected
