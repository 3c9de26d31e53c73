"""Where a model comes from: local directories, shipped architectures, hub ids; a missing one is named."""

import pytest
from cli_runner import assert_one_line_error, run_cli

from sharelora_cli.core.errors import UserError
from sharelora_cli.models.loading import resolve_model_path


@pytest.mark.parametrize("name", ["gpt2", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B"])
def test_hub_ids_pass_through_unchanged(name):
    assert resolve_model_path(name) == name


def test_a_shipped_architecture_resolves_to_its_config_directory():
    assert resolve_model_path("llama-7b").endswith("recipes/models/llama-7b")


@pytest.mark.parametrize("name", ["./nope", "../nope/model", "/no/such/dir", "runs/../nope"])
def test_a_missing_local_directory_is_named_as_missing(name):
    with pytest.raises(UserError, match=f"model.name_or_path: directory '{name}' does not exist"):
        resolve_model_path(name)


def test_train_names_a_missing_model_directory_in_one_line(tmp_path):
    missing = str(tmp_path / "nope")
    assert_one_line_error(
        run_cli("train", "quickstart", f"model.name_or_path={missing}", f"output_dir={tmp_path / 'run'}"),
        f"model.name_or_path: directory '{missing}' does not exist",
    )


def test_a_missing_artifact_says_how_to_build_it(tmp_path):
    line = assert_one_line_error(
        run_cli("train", "quickstart", "model.name_or_path=artifacts/never-built", f"output_dir={tmp_path / 'run'}"),
        "artifacts/never-built",
        "does not exist",
    )
    assert "scripts/make_tiny_model.py artifacts/never-built" in line
