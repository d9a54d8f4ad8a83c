"""The registered model's Python face: `HintPyfunc` (what `mlflow.pyfunc.load_model` returns and
`mlflow models serve` runs) over the serving side's CachedPredictor, so a served registered
model also generates each task's state once and keeps it (LRU, bounded in MiB) across calls."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

from hint_platform.serving.predictor import CachedPredictor

EXPORT_ARTIFACT = "export"  # the artifact key of the export directory inside the logged model


class HintPyfunc(mlflow.pyfunc.PythonModel):
    """`predict(DataFrame[instruction, input]) -> list[str]`, one output per row."""

    def load_context(self, context):
        self.predictor = CachedPredictor(context.artifacts[EXPORT_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        missing = {"instruction", "input"} - set(model_input.columns)
        if missing:
            raise ValueError(f"model input: missing column(s) {', '.join(sorted(missing))} "
                             "(expected instruction, input)")
        return self.predictor.predict(list(model_input["instruction"]), list(model_input["input"]))
