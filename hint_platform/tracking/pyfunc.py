"""The registered model's Python face: `HintPyfunc` (what `mlflow.pyfunc.load_model` returns)
over `HintPredictor` (an export loaded for inference)."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from hint_platform import export
from hint_platform.evaluation.inference import generate_outputs, task_modules
from pipelines import formats

EXPORT_ARTIFACT = "export"  # the artifact key of the export directory inside the logged model


class HintPredictor:
    """An export directory loaded for inference: (instruction, input) pairs -> outputs."""

    def __init__(self, export_dir: str | Path, max_new_tokens: int = 64, batch_size: int = 16,
                 max_input_len: int = 1024):
        self.model, self.tokenizer = export.load(export_dir)
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
