"""Where the project's own files live: shipped recipes, shared benchmark data."""

import os
import sys
from pathlib import Path


def _is_checkout(folder: Path) -> bool:
    return (folder / "recipes").is_dir() and (folder / "pyproject.toml").is_file()


def _find_checkout() -> Path:
    """The project checkout: the one this package runs from (editable install), else, for a package installed
    into site-packages, the working directory or the nearest folder above it that is a checkout, else the
    working directory itself (no checkout: recipes come from the installed copy, data from $SHARELORA_DATA)."""
    editable = Path(__file__).resolve().parents[2]
    if _is_checkout(editable):
        return editable
    cwd = Path.cwd().resolve()
    return next((folder for folder in (cwd, *cwd.parents) if _is_checkout(folder)), cwd)


PROJECT_ROOT = _find_checkout()
# A wheel installs the shipped recipes under <prefix>/share/sharelora (pyproject.toml's data-files), so that
# `sharelora train quickstart` works without a checkout.
_INSTALLED_RECIPES = Path(sys.prefix) / "share" / "sharelora" / "recipes"
RECIPES_DIR = PROJECT_ROOT / "recipes" if _is_checkout(PROJECT_ROOT) else _INSTALLED_RECIPES


def data_dir() -> Path:
    """Benchmark data: $SHARELORA_DATA, else ../shared/data beside the project checkout."""
    env = os.environ.get("SHARELORA_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"
