"""Benchmarks that print ratios against a peer measured in the same run (docs/benchmarks.md). A package, so one
bench imports another's helpers (`from bench.comm_formulas import ...`) without touching sys.path; run each from
the repository root as `python -m bench.<name>`. Not part of the wheel: pyproject's packages.find takes dsv4train*
only."""
