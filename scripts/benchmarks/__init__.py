"""Benchmarks: each prints JSON (medians and ratios against a baseline measured in the same run)."""
