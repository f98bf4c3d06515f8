"""Measures and reports: CLI, matrix runner, metrics, NVML, equivalence, reports."""
