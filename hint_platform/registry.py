"""The model registry: log a training export as an MLflow `pyfunc` model, register it, alias it,
and load `models:/NAME@ALIAS` back for evaluation or inference.

The logged model is "model from code" (hint_platform/mlflow_model.py): MLflow stores a reference
to `HintPyfunc` and the export directory (safetensors weights, config.json, tokenizer) as an
artifact, so nothing is pickled. `predict` takes a table with `instruction` and `input` columns
and returns one output string per row; rows sharing an instruction share one module generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from hint_model import HintModel
from hint_platform.errors import UserError
from hint_platform.evaluate import EXPORT_TOKENIZER, generate_outputs, task_modules
from hint_platform.tracking import login, mlflow_client, tracking_uri_scope
from pipelines import formats, load_tokenizer

EXPORT_ARTIFACT = "export"  # the artifact key of the export directory inside the logged model
_MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
_SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "instruction"), ColSpec("string", "input")]),
                            outputs=Schema([ColSpec("string")]))
# What a serving environment needs to import the model; explicit so that MLflow does not load
# the model once more just to infer it.
_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "sentencepiece==0.2.3", "safetensors",
                 "mlflow==3.17.2"]


class RegistryError(UserError):
    """A registry name, version, alias or URI that does not resolve: the message names it."""


class HintPredictor:
    """An export directory loaded for inference: (instruction, input) pairs -> outputs."""

    def __init__(self, export_dir: str | Path, max_new_tokens: int = 64, batch_size: int = 16,
                 max_input_len: int = 1024):
        self.model = HintModel.from_pretrained(str(export_dir)).eval()
        self.tokenizer = load_tokenizer(Path(export_dir) / EXPORT_TOKENIZER)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_input_len = max_input_len

    def predict(self, instructions: list[str], inputs: list[str]) -> list[str]:
        if len(instructions) != len(inputs):
            raise ValueError(f"{len(instructions)} instructions for {len(inputs)} inputs")
        rows_by_instruction: dict[str, list[int]] = {}
        for i, instruction in enumerate(instructions):
            rows_by_instruction.setdefault(instruction, []).append(i)
        outputs: list[str] = [""] * len(inputs)
        for instruction, rows in rows_by_instruction.items():
            texts = [self.texts(instruction, inputs[i]) for i in rows]
            max_hyper = self.model.config.max_hyper_len
            hyper = tuple(self.tokenizer.encode(texts[0][0], max_hyper)) if texts[0][0] else ()
            modules = task_modules(self.model, hyper)
            ids = [self.tokenizer.encode(model_input, self.max_input_len) for _, model_input in texts]
            outs = generate_outputs(self.model, self.tokenizer, modules, ids,
                                    batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)
            for i, out in zip(rows, outs):
                outputs[i] = out
        return outputs


    def texts(self, instruction: str, input_text: str) -> tuple[str, str]:
        """(hypernetwork text, model text) in the SNI format the model's variant trains on."""
        cfg = self.model.config
        if cfg.hypernetwork:
            return formats.sni_def(instruction, input_text)
        if cfg.variant == "no_instruct":
            return formats.no_instruct(input_text)
        return formats.sni_concat(instruction, [], 0, input_text)


class HintPyfunc(mlflow.pyfunc.PythonModel):
    """The MLflow face of `HintPredictor`."""

    def load_context(self, context):
        self.predictor = HintPredictor(context.artifacts[EXPORT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        missing = {"instruction", "input"} - set(model_input.columns)
        if missing:
            raise ValueError(f"model input: missing column(s) {', '.join(sorted(missing))} "
                             "(expected instruction, input)")
        return self.predictor.predict(list(model_input["instruction"]), list(model_input["input"]))


def log_and_register(export_dir: str | Path, *, tracking_uri: str, run_id: str | None = None,
                     name: str | None = None) -> dict[str, Any]:
    """Logs `export_dir` as a pyfunc model into run `run_id` (a new run if None) and, with a
    `name`, registers it. Returns {"model_uri", "run_id", "name", "version"}."""
    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():
        raise RegistryError(f"{export_dir}: not a model export (no config.json)")
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


def load_pyfunc(model_uri: str, tracking_uri: str | None = None):
    """The registered pyfunc model (`.predict(DataFrame[instruction, input]) -> list[str]`)."""
    with tracking_uri_scope(tracking_uri):
        try:
            return mlflow.pyfunc.load_model(model_uri)
        except mlflow.exceptions.MlflowException as e:
            raise RegistryError(f"cannot load {model_uri} from {mlflow.get_tracking_uri()}: {e.message}") from None
