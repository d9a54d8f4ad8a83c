"""The model registry: log a training export as an MLflow `pyfunc` model, register it, alias it,
and load `models:/NAME@ALIAS` back for evaluation or inference.

The logged model is "model from code" (tracking/pyfunc_model.py): MLflow stores a reference
to `HintPyfunc` (tracking/pyfunc.py) and the export directory (safetensors weights,
config.json, tokenizer) as an artifact, so nothing is pickled. `predict` takes a table with `instruction` and `input` columns
and returns one output string per row; rows sharing an instruction share one module generation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from hint_platform.errors import UserError
from hint_platform.export import check as check_export
from hint_platform.tracking.pyfunc import EXPORT_ARTIFACT
from hint_platform.tracking.runs import login, mlflow_client, tracking_uri_scope

_MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
_SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "instruction"), ColSpec("string", "input")]),
                            outputs=Schema([ColSpec("string")]))
# What a serving environment needs to import the model; explicit so that MLflow does not load
# the model once more just to infer it.
_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "sentencepiece==0.2.3", "safetensors",
                 "mlflow==3.17.2"]


class RegistryError(UserError):
    """A registry name, version, alias or URI that does not resolve: the message names it."""


def log_and_register(export_dir: str | Path, *, tracking_uri: str, run_id: str | None = None,
                     name: str | None = None) -> dict[str, Any]:
    """Logs `export_dir` as a pyfunc model into run `run_id` (a new run if None) and, with a
    `name`, registers it. Returns {"model_uri", "run_id", "name", "version"}."""
    export_dir = Path(export_dir)
    check_export(export_dir, digests=True)  # a partial export is never logged
    try:
        with tracking_uri_scope(tracking_uri), mlflow.start_run(run_id=run_id) as run:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(_MODEL_CODE), artifacts={EXPORT_ARTIFACT: str(export_dir)},
                signature=_SIGNATURE, pip_requirements=_REQUIREMENTS, registered_model_name=name,
            )
    except mlflow.exceptions.MlflowException as e:
        who = login(tracking_uri)[1] or "an anonymous client"
        if e.error_code == "PERMISSION_DENIED":
            raise RegistryError(f"{who} may not log or register models at {tracking_uri}: "
                                "registering needs a writer's account (EDIT on the experiment "
                                "and the registered model; infra/mlflow/bootstrap_users.py)") from None
        raise RegistryError(f"cannot log and register {export_dir} at {tracking_uri}: {e.message}") from None
    version = info.registered_model_version
    return {"model_uri": f"models:/{name}/{version}" if name else info.model_uri,
            "run_id": run.info.run_id, "name": name, "version": version}


def list_versions(tracking_uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Registered versions (of `name`, or of every model), newest first, with their aliases."""
    query = f"name='{name}'" if name else None
    rows, aliases_of = [], {}
    with mlflow_client(tracking_uri) as client:
        for mv in client.search_model_versions(query):
            if mv.name not in aliases_of:  # version searches leave aliases out; the model has them
                aliases_of[mv.name] = client.get_registered_model(mv.name).aliases or {}
            aliases = sorted(a for a, v in aliases_of[mv.name].items() if int(v) == int(mv.version))
            rows.append({"name": mv.name, "version": int(mv.version), "aliases": aliases,
                         "run_id": mv.run_id, "created": mv.creation_timestamp})
    if name and not rows:
        raise RegistryError(f"no registered model named {name!r} at {tracking_uri}")
    return sorted(rows, key=lambda r: (r["name"], -r["version"]))


def set_alias(tracking_uri: str, name: str, alias: str, version: int) -> None:
    try:
        with mlflow_client(tracking_uri) as client:
            client.set_registered_model_alias(name, alias, str(version))
    except mlflow.exceptions.MlflowException as e:
        raise RegistryError(f"cannot point alias {alias!r} of {name!r} at version {version}: "
                            f"{e.message}") from None


def resolve_export(model: str, tracking_uri: str | None = None) -> Path:
    """An export directory: `model` itself when it is one, else the export inside the logged
    model `models:/NAME@ALIAS` (or `models:/NAME/VERSION`, `runs:/...`), downloaded."""
    if "://" not in model and not model.startswith("models:/"):
        path = Path(model)
        if not (path / "config.json").is_file():
            raise RegistryError(f"{model}: not a model export directory nor a models:/ URI")
        check_export(path)
        return path
    with tracking_uri_scope(tracking_uri):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model)
        except mlflow.exceptions.MlflowException as e:
            raise RegistryError(f"cannot load {model} from {mlflow.get_tracking_uri()}: {e.message}") from None
    export = Path(local) / "artifacts" / EXPORT_ARTIFACT
    if not export.is_dir():
        raise RegistryError(f"{model}: not a hint model (no {EXPORT_ARTIFACT} artifact)")
    return export


def model_source(model: str, tracking_uri: str | None = None) -> dict[str, str]:
    """Where `model` (what resolve_export takes) comes from, for provenance: {"model": the
    export's absolute path or the URI} and, for `models:/NAME/VERSION` or `models:/NAME@ALIAS`,
    the registered name, version and the run that logged it (`runs:/RUN_ID/...`: the run)."""
    if "://" not in model and not model.startswith("models:/"):
        return {"model": os.path.abspath(model)}
    if model.startswith("runs:/"):
        return {"model": model, "run_id": model.removeprefix("runs:/").split("/")[0]}
    if not model.startswith("models:/"):
        return {"model": model}
    name, _, version = model.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    try:
        with mlflow_client(tracking_uri) as client:
            found = (client.get_model_version_by_alias(name, alias) if alias
                     else client.get_model_version(name, version))
    except mlflow.exceptions.MlflowException as e:
        raise RegistryError(f"cannot look up {model} at {tracking_uri}: {e.message}") from None
    return {"model": model, "registered_name": found.name, "registered_version": str(found.version),
            "run_id": found.run_id}


def tag_run(tracking_uri: str, run_id: str, key: str, value: str) -> None:
    """Set tag `key` on run `run_id` (e.g. an adapter exported from the model it logged)."""
    try:
        with mlflow_client(tracking_uri) as client:
            client.set_tag(run_id, key, value)
    except mlflow.exceptions.MlflowException as e:
        raise RegistryError(f"cannot tag run {run_id} at {tracking_uri}: {e.message}") from None


def load_pyfunc(model_uri: str, tracking_uri: str | None = None):
    """The registered pyfunc model (`.predict(DataFrame[instruction, input]) -> list[str]`)."""
    with tracking_uri_scope(tracking_uri):
        try:
            return mlflow.pyfunc.load_model(model_uri)
        except mlflow.exceptions.MlflowException as e:
            raise RegistryError(f"cannot load {model_uri} from {mlflow.get_tracking_uri()}: {e.message}") from None
