"""Benchmarks: numbers to report, not pass/fail tests."""
