"""``python -m bench``: run the benchmark suite (see bench/run_suite.py, docs/BENCHMARKS.md)."""

import sys

from bench.run_suite import main

sys.exit(main())
