"""Measurement, with neither Ray nor MLflow: applying a recipe (compress, kernels, pruning,
encoder windows), decoding, scoring, and measuring a model next to its baseline (evaluate)."""
