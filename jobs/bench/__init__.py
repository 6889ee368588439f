"""Benchmarks: ``python -m jobs.bench <name> [flags]``. Each prints its figures and ends with one JSON line."""
