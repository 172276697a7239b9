"""Benchmarks of opencti-sync (docs/PERFORMANCE.md); run with ``bench/run``."""
