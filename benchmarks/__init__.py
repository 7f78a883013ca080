"""Benchmarks: engine, KV transfer and serving. Each prints a table and writes JSON.

Benchmarks are not tests: they measure, side by side with a baseline in the same run,
and report ratios.
"""
