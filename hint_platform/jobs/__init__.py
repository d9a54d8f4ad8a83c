"""Cluster jobs: `hint submit` and `hint jobs` through Ray Jobs (submit.py)."""
