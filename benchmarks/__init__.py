"""Measurements, not tests: run each from the checkout's root as `python -m benchmarks.<name>` (see README.md)."""
