"""Scores: one engine (generation and log-likelihood) running tasks that are data (GSM8K, MMLU, HumanEval,
perplexity), results files, and sandbox/, where HumanEval samples run. Imports core, config, data (training
prompt formats, to ask in them), models and adapters (an evaluated model is a base plus an adapter); sandbox/
imports only core."""
