"""Benchmarks that check kvmatrix's own measurements against other tools (not tests: they print numbers)."""
