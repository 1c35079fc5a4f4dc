"""Benchmarks: plain `python -m bench.X` modules, not run in CI."""
