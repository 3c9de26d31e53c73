"""sharelora: fine-tune causal LMs with shared low-rank adapters from YAML recipes.

Sub-packages by stage of the data path, bottom to top: core, config, data, models, adapters, evaluation,
training, outputs; cli.py is the top. A sub-package imports only from those below it (tests/test_imports.py)."""
