"""Test helpers shared by tests/unit and tests/integration (no test module imports another)."""
