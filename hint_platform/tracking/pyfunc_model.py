"""The MLflow "model from code" file of a logged hint model: MLflow copies it into the model and
runs it at load time; `set_model` names the pyfunc (hint_platform.tracking.pyfunc.HintPyfunc)."""

import mlflow

from hint_platform.tracking.pyfunc import HintPyfunc

mlflow.models.set_model(HintPyfunc())
