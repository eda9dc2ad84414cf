"""Metrics, tracing and logs, fed by the engine's hooks."""
