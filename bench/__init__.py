"""Benchmarks (``make bench``): each module has ``main(argv) -> int`` and writes to ``bench/results/``."""
