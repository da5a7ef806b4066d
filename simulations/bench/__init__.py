"""Benchmarks of fedtier's hot paths, each measured against a raw baseline in the same run."""
