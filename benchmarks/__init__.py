"""Timed, reproducible measurements (run as scripts; see benchmarks/common.py)."""
