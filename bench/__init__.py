"""Benchmarks and load tools (not part of the test suite): `python -m bench` runs the scenarios."""
