"""Benchmarks of the suite's hot paths (pytest-benchmark); a package so that pytest puts ``tests/``
on ``sys.path`` and ``tiny_llm`` imports as in the other tests."""
