"""Tracking and the registry: MLflow runs and the tracking URI (runs.py), the model registry
(registry.py), and the registered model's pyfunc (pyfunc.py, pyfunc_model.py)."""
