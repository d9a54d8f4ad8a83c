"""Studies through real Ray Tune and a real MLflow SQLite store, with a quick trial function
(a learning curve from the trial's config) in place of training: validation, the parent and
child runs, an interrupted study resumed, the report. tests/test_tune_train.py runs real
training."""

import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune as ray_tune

from hint_platform.tuning import study_runs
from hint_platform.tuning.plan import load_study_run
from hint_platform.tuning.runner import run_study
from hint_platform import cli
from hint_platform.config import ConfigError, ExperimentConfig
from hint_platform.errors import TrainingError
from hint_platform.tuning.report import leaderboard
from tune_spaces import STUDIES, Study, load_study

LRS = [0.5, 0.001]


def write_base(tmp_path: Path, relative: bool = False, **train) -> Path:
    """A base config whose inputs exist (the quick trials read none of them); with `relative`,
    its paths are relative to tmp_path."""
    (tmp_path / "data" / "sni").mkdir(parents=True, exist_ok=True)
    (tmp_path / "tokenizer").mkdir(exist_ok=True)
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(b"")
    at = "" if relative else f"{tmp_path}/"
    cfg = ExperimentConfig(name="toy").with_overrides({
        "data.tokenizer": f"{at}tokenizer",
        "data.train": [{"kind": "sni", "path": f"{at}data/sni", "format": "def"}],
        "train.max_steps": 4, "train.global_batch_size": 8,
        "run.storage_path": f"{at}runs", "run.tracking_uri": f"sqlite:///{at}mlflow.db",
        **{f"train.{k}": v for k, v in train.items()}})
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def lr_study(**settings) -> Study:
    return Study(name="lr", question="Which learning rate?",
                 space={"train.lr": ray_tune.grid_search(LRS)}, base_overrides={}, **settings)


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_validates_against_its_base_config(name):
    run = load_study_run(name, check_data=False)
    assert run.study is load_study(name)
    assert run.path.name == f"{run.base.name}-{name}"


@pytest.mark.parametrize("study, overrides, message", [
    ("peft_sise", [], "unknown study 'peft_sise'; studies: generator, peft_size"),
    ("peft_type", ["train.lrr=0.1"], "unknown key train.lrr; valid keys under train:"),
    (Study("s", "q", {"model.overrides.adapter_sise": ray_tune.choice([8])}), [],
     "study s, search-space key model.overrides.adapter_sise: model: unknown HintConfig "
     "field 'adapter_sise'"),
    (Study("s", "q", {"train.optimiser": ray_tune.loguniform(1e-4, 1e-2)}), [],
     "study s, search-space key train.optimiser: unknown key train.optimiser"),
    (Study("s", "q", {"model.variant": ray_tune.grid_search(["hint", "hint_big"])}), [],
     "study s, search-space key model.variant: model: unknown variant 'hint_big'"),
    (Study("s", "q", {"model.overrides.generator": ray_tune.grid_search(["component", "decoder"]),
                      "model.overrides.generator_heads": ray_tune.choice([2])}), [],
     "study s, search-space point {'model.overrides.generator': 'decoder', "
     "'model.overrides.generator_heads': 2}: model:"),
])
def test_bad_study_or_key_fails_before_any_trial(tmp_path, study, overrides, message):
    base = write_base(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_study_run(study, base, overrides)
    assert message in str(error.value)
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_interrupted_study_resumes_without_rerunning_finished_trials(tmp_path, ray_local):
    """Trial 2 interrupts the driver (SIGINT, as Ctrl-C would) when it first starts; running
    the study again finishes it, and trial 1 never runs again. MLflow keeps one parent and one
    child per trial; the report lists both trials and logs its plots to the parent."""
    starts = tmp_path / "starts"
    starts.mkdir()
    driver = os.getpid()

    def quick_trial(cfg):  # nested: cloudpickle ships it to the trial by value
        from ray import tune as rt

        marker = starts / f"{cfg.train.lr}"
        first = not marker.exists()
        marker.write_text(marker.read_text() + "x" if not first else "x")
        if cfg.train.lr == LRS[1] and first:
            os.kill(driver, signal.SIGINT)
            time.sleep(30)  # stopped by the driver long before
        for step in range(1, cfg.train.max_steps + 1):
            rt.report({"step": step, "eval_loss": 1.0 / (cfg.train.lr * step)})

    run = load_study_run(lr_study(max_concurrent=1, scheduler="fifo"), write_base(tmp_path))
    assert run_study(run, quick_trial) is False
    assert {p.name: p.read_text() for p in starts.iterdir()} == {"0.5": "x", "0.001": "x"}
    client = MlflowClient(run.tracking_uri)
    parent = study_runs.parent_run_id(run)
    assert client.get_run(parent).info.status == "KILLED"

    assert run_study(run, quick_trial) is True
    assert {p.name: p.read_text() for p in starts.iterdir()} == {"0.5": "x", "0.001": "xx"}
    assert study_runs.parent_run_id(run) == parent
    assert client.get_run(parent).info.status == "FINISHED"
    children = study_runs.child_runs(run, parent)
    assert len(children) == 2
    assert sorted(float(c.data.params["train.lr"]) for c in children) == sorted(LRS)
    assert len({c.data.tags[study_runs.TRIAL_TAG] for c in children}) == 2
    assert sorted(c.data.tags[study_runs.POINT_TAG] for c in children) == ["train.lr=0.001",
                                                                       "train.lr=0.5"]
    # the resolved model config: the same param names in every trial, for MLflow's compare view
    assert {c.data.params["model.config.adapter_size"] for c in children} == {"8"}
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert [c.data.tags[study_runs.OUTCOME_TAG] for c in children] == ["done", "done"]

    rows = leaderboard(run)
    assert [r.point for r in rows] == ["train.lr=0.5", "train.lr=0.001"]  # best first
    assert [r.status for r in rows] == ["done", "done"]
    assert rows[0].metric == pytest.approx(1 / (0.5 * 4))
    assert rows[0].curve == ([1, 2, 3, 4], [1 / (0.5 * s) for s in (1, 2, 3, 4)])
    best = [c for c in children if c.data.tags.get(study_runs.BEST_TAG) == "true"]
    assert [b.data.params["train.lr"] for b in best] == ["0.5"]
    report = run.path / "report"
    assert "train.lr=0.5" in (report / "leaderboard.txt").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == ["eval_loss_vs_gflops.png", "eval_loss_vs_peft_size.png",
                    "learning_curves.png"]
    assert all((report / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {f"report/{p}" for p in pngs} | {"report/leaderboard.txt"} <= logged
    trial_dirs = {p.parent for p in run.path.glob("*/events.out.tfevents.*")}  # TensorBoard
    assert len(trial_dirs) == 2


@pytest.mark.parametrize("argv, message", [
    (["tune", "peft_type", "train.lrr=0.1"], "hint tune: error: unknown key train.lrr"),
    (["tune", "peft_type", "--scheduler", "asha", "model.overrides.adapter_sise=8"],
     "base.yaml: model: unknown HintConfig field 'adapter_sise'"),
    (["tune", "fusion", "--grace-period", "0"], "grace_period must be at least 1, got 0"),
    (["tune", "report", "fusion"], "no results for study toy-fusion under"),
])
def test_cli_errors_name_what_is_wrong(tmp_path, capsys, argv, message):
    assert cli.main([*argv, "--config", str(write_base(tmp_path))]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no study directory, no tracking store


@pytest.mark.parametrize("argv, message", [
    (["tune", "peft_sise"], "invalid choice: 'peft_sise'"),
    (["tune", "report"], "the following arguments are required: STUDY"),
    (["tune", "report", "peft_sise"], "invalid choice: 'peft_sise'"),
])
def test_cli_refuses_unknown_studies(tmp_path, capsys, argv, message):
    """Each study is a subcommand, and so is `report`: `hint tune report` is no study."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--config", str(write_base(tmp_path))])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_study_whose_data_is_missing_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    """From a directory without the data (the default base config's relative paths), and with
    an option before an override: the missing path is named, nothing is started or written."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["tune", "fusion"]) == 2
    err = capsys.readouterr().err
    assert f"data.train[0].path: {tmp_path}/data/natural-instructions does not exist" in err
    assert len(err.strip().splitlines()) == 1
    base = write_base(tmp_path, relative=True)
    assert cli.main(["tune", "fusion", "--config", str(base), "data.tokenizer=nowhere"]) == 2
    assert f"data.tokenizer: {tmp_path}/nowhere does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert cli.main(["tune", "report", "fusion"]) == 2  # a report needs results, not data
    assert "no results for study hint-3b-sni-def-fusion" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_trials_see_the_users_paths_and_a_study_of_failed_trials_is_an_error(
        tmp_path, monkeypatch, ray_local):
    """Started from tmp_path with relative paths, each trial (running in Tune's own directory)
    gets them absolute; every trial failing fails the study with the first trial's error."""
    monkeypatch.chdir(tmp_path)
    seen = tmp_path / "seen"
    seen.mkdir()

    def failing_trial(cfg):  # nested: cloudpickle ships it to the trial by value
        from hint_platform.config import ConfigError as Refused

        (seen / str(cfg.train.lr)).write_text("\n".join([
            os.getcwd(), cfg.data.train[0]["path"], cfg.data.tokenizer, cfg.run.tracking_uri]))
        raise Refused(f"no luck at lr={cfg.train.lr}")

    run = load_study_run(lr_study(max_concurrent=1, scheduler="fifo"),
                         write_base(tmp_path, relative=True))
    with pytest.raises(TrainingError, match=r"all 2 trials failed .*; the first: no luck at lr=0.5$"):
        run_study(run, failing_trial)
    for lr in LRS:
        cwd, data, tokenizer, uri = (seen / str(lr)).read_text().splitlines()
        assert Path(cwd) != tmp_path  # Tune's trial directory
        assert (data, tokenizer) == (f"{tmp_path}/data/sni", f"{tmp_path}/tokenizer")
        assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert [r.status for r in leaderboard(run)] == ["failed", "failed"]
