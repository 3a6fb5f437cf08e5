"""Benchmark suites, one module each (NAME, DESCRIPTION, run(bench)); see kiln.bench.core."""
