"""Where the project's own files live: shipped recipes, shared benchmark data."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIR = PROJECT_ROOT / "recipes"


def data_dir() -> Path:
    """Benchmark data: $SHARELORA_DATA, else ../shared/data beside the project checkout."""
    env = os.environ.get("SHARELORA_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"
