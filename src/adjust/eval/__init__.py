"""Metrics and benchmarks: joint KL, MAUVE, NLL, task validity, throughput."""
