"""Benchmark scripts (not part of the test suite): each prints a table and writes results/*.json."""
