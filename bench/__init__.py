"""Benchmarks: `uv run python bench/run_all.py` runs them all (docs/performance.md)."""
