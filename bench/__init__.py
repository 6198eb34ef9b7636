"""pop3proxy's benchmark suite: ``python -m bench`` (``--quick`` for a smoke run).

Not a test suite: pytest does not collect it (it lives outside tests/ and has no test_*.py files).
See docs/BENCHMARKS.md for what it measures and the latest results.
"""
