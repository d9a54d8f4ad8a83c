"""The paper as runnable plans: `hint paper list|run|table` (plan.py: the tables and their
chains of stages; stages.py: a stage as a config and overrides; runner.py: running them; tables.py:
assembling each table from MLflow)."""
