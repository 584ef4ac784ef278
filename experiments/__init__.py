"""Benchmark and ablation scripts; run each with ``python -m experiments.NAME``."""
