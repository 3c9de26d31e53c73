"""Where a recipe becomes data: JSONL formats to tokenized, loss-masked examples, collation, packing, the step
sampler, and the synthetic skills the tiny base learns. Imports core and config."""
