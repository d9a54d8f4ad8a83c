"""Evaluation: pure metrics (metrics.py), running a model over evaluation tasks (inference.py),
and evaluating an export on a config's evaluation sources (evaluate.py)."""
