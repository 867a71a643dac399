"""Benchmarks for stickyproxy (see bench/README.md)."""
