"""A study whose trials are real training runs (hint_platform.train.fit on Ray Train) of a tiny
HINT on the synthetic suite: it runs to the end, ASHA stops the trial that cannot win, and
MLflow holds the study's parent run with exactly one child per trial, with metrics."""

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune as ray_tune

from hint_platform.tuning import study_runs
from hint_platform.tuning.plan import load_study_run
from hint_platform.tuning.runner import run_study
from hint_platform.config import ExperimentConfig
from hint_platform.tuning.report import leaderboard
from pipelines import train_tokenizer, write_suite
from tune_spaces import Study

MAX_STEPS = 6
GOOD_LR, HOPELESS_LR = 1e-2, 1e-9


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune_train")
    suite = write_suite(tmp / "data", num_train_tasks=21, num_test_tasks=2, instances_per_task=5,
                        num_pretrain_docs=5)
    tokenizer = train_tokenizer(suite.texts(), tmp / "tokenizer", vocab_size=300)
    cfg = ExperimentConfig(name="tiny").with_overrides({
        "model.preset": "tiny", "model.overrides.vocab_size": tokenizer.vocab_size,
        "data.tokenizer": str(tmp / "tokenizer"), "data.train": [suite.sni_spec()],
        "data.eval": [suite.sni_spec(part="test")],
        "data.max_input_len": 32, "data.max_hyper_len": 32, "data.max_target_len": 16,
        "train.num_workers": 1, "train.fsdp": False, "train.optimizer": "adamw",
        "train.global_batch_size": 32, "train.micro_batch_size": 32,
        "train.max_steps": MAX_STEPS, "train.log_every": 1, "train.checkpoint_every": 0,
        "train.eval_every": 3,
        "run.storage_path": str(tmp / "runs"), "run.experiment": "tune-test",
        "run.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"})
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_study_of_real_training_runs_asha_stops_the_hopeless_trial(base_config, ray_local):
    # Trials run one after the other, the good one first: at ASHA's first rung (step 3) the
    # hopeless one has the good one's result to lose against. Both are evaluated (eval_loss,
    # the study's metric) at ASHA's rungs, steps 3 and 6, on the same 10 held-out examples.
    study = Study(name="lr", question="Which learning rate?", metric="eval_loss",
                  space={"train.lr": ray_tune.grid_search([GOOD_LR, HOPELESS_LR])},
                  base_overrides={}, grace_period=3, max_concurrent=1)
    run = load_study_run(study, base_config)
    assert run_study(run) is True

    rows = {r.point: r for r in leaderboard(run)}
    good, hopeless = rows[f"train.lr={GOOD_LR}"], rows[f"train.lr={HOPELESS_LR}"]
    assert (good.status, good.steps) == ("done", MAX_STEPS)
    assert hopeless.status == "stopped early" and hopeless.steps < MAX_STEPS
    assert good.metric < hopeless.metric

    client = MlflowClient(run.tracking_uri)
    parent = study_runs.parent_run_id(run)
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags[f"{study_runs.BEST_TAG}_trial"] == good.trial_id
    children = {c.data.tags[study_runs.TRIAL_TAG]: c for c in study_runs.child_runs(run, parent)}
    assert sorted(children) == sorted([good.trial_id, hopeless.trial_id])  # exactly one each
    for trial_id, child in children.items():
        history = client.get_metric_history(child.info.run_id, "loss")
        steps = [m.step for m in history]
        assert steps == sorted(set(steps)) and steps[0] == 1  # every step logged once
        assert child.data.params["model.preset"] == "tiny"
    assert len(client.get_metric_history(children[good.trial_id].info.run_id, "loss")) == MAX_STEPS
    assert children[good.trial_id].info.status == "FINISHED"
    assert children[hopeless.trial_id].info.status == "KILLED"
    assert children[hopeless.trial_id].data.tags[study_runs.OUTCOME_TAG] == "stopped early"
    assert children[good.trial_id].data.tags[study_runs.BEST_TAG] == "true"
