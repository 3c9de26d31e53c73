"""Recipes: the typed schema (the single source of every default), YAML loading with OmegaConf, overrides and
one-line validation errors. Imports only core."""
