"""Tracking: URI resolution, the fail-fast reachability check, and the run a training opens
(a real SQLite store)."""

from __future__ import annotations

import os
import socket
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from hint_platform.config import from_dict
from hint_platform.tracking.runs import (TrackingError, check_reachable, experiment_run, open_run,
                                         resolve_tracking_uri, tracking_uri_scope)


def make_cfg(tmp_path, **run):
    return from_dict({"name": "t", "train": {"max_steps": 5},
                      "run": {"storage_path": str(tmp_path), **run}})


def test_uri_precedence_config_then_env_then_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(make_cfg(tmp_path)) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(make_cfg(tmp_path)) == "http://127.0.0.1:5999"
    cfg = make_cfg(tmp_path, tracking_uri="sqlite:///x.db")
    assert resolve_tracking_uri(cfg) == "sqlite:///x.db"


def test_unreachable_server_fails_fast_naming_the_uri():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"http://127.0.0.1:{port}"):
        check_reachable(f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 10
    with pytest.raises(TrackingError, match="ftp://host"):
        check_reachable("ftp://host/x")


def test_run_is_reopened_by_name_and_changed_params_become_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(tmp_path)
    uri = resolve_tracking_uri(cfg)
    run_id = open_run(cfg, uri)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params["train.max_steps"] == "5"
    assert run.data.params["name"] == "t"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "hint").as_uri()
    longer = cfg.with_overrides(["train.max_steps=9"])
    assert open_run(longer, uri) == run_id
    run = client.get_run(run_id)
    assert run.data.params["train.max_steps"] == "5"
    assert run.data.tags["hint.resumed_with.train.max_steps"] == "9"
    other = cfg.with_overrides(["name=u"])
    assert open_run(other, uri) != run_id


def test_a_scoped_tracking_uri_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes $MLFLOW_TRACKING_URI; inside the platform that would send
    every later run of the process to the last store used."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    with tracking_uri_scope(uri):
        assert os.environ["MLFLOW_TRACKING_URI"] == uri and mlflow.get_tracking_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with tracking_uri_scope(uri):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"


def test_a_run_in_one_store_leaves_no_experiment_behind_for_the_next(tmp_path):
    """An evaluation logged to one store, then a model registered in a fresh store from the same
    process (the suite's order found it): the second run must not look for the first's
    experiment id (mlflow.set_experiment's process-wide state did)."""
    first, second = (f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("a", "b"))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with experiment_run(first, "evaluations", "eval") as run:
        mlflow.log_metric("rougeL", 1.0)
    assert run.info.experiment_id != "0"
    with tracking_uri_scope(second), mlflow.start_run() as other:  # as log_and_register does
        mlflow.log_metric("x", 1.0)
    assert other.info.experiment_id == "0"
