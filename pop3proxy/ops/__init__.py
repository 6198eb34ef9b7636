"""Observability at the bottom of the layers: metrics (counters), logs, units (how sizes and ages are written)."""
