"""Benchmark runners behind ``lsnet bench NAME`` (specs in ``jobs/bench/NAME.yaml``)."""
