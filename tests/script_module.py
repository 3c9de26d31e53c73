"""A script under scripts/ imported as a module, so a test runs its main() in-process (a subprocess would
re-import torch and transformers)."""

import importlib.util
from types import ModuleType

from sharelora_cli.core.paths import PROJECT_ROOT


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
