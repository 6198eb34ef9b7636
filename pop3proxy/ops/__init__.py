"""Observability and administration: metrics, logs, status."""
