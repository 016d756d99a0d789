"""Benchmarks of dask_pervasive (not tests)."""
