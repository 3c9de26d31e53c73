"""Base models: loading a causal LM and its tokenizer (full precision or 4-bit NF4 through bitsandbytes), the
tiny Llama built from a config and its pretraining. Imports core, config and data."""
