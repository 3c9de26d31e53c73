"""The adapters: the layer interface (base.py), one file per method, the registry, the fused shared-input path,
injection into a model, the sharing plan, adapter files and parameter counts. Imports core, config, data and
models; training, evaluation and outputs all build on it."""
