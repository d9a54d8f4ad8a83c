"""Tuning: Ray Tune studies over the training run. plan.py checks a study before it runs,
runner.py runs it, study_runs.py keeps its MLflow runs, report.py writes its leaderboard."""
