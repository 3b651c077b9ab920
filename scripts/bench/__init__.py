"""Benchmarks: make bench (in-process vs served vs stock, python -m scripts.bench), make tune,
the lean load generator (wrk) and the single-request latency check."""
