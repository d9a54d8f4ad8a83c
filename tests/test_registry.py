"""The registry against a real, authenticated `mlflow server --app-name basic-auth` on loopback
(tests/conftest.py): a tiny training run whose tracking URI carries `hint:PASSWORD@` registers
its export, and the password shows nowhere (params, printed lines, the run directory's files); an
alias points at it and a FRESH process, logged in through the environment, loads
`models:/NAME@ALIAS`; logins that are missing, wrong or read-only fail before Ray starts or
cannot register; and `hint` loads a registered version from its weights without running the
model's code, even when that code was tampered with."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from hint_platform import cli, config
from hint_platform.tracking import registry
from hint_platform.serving.predictor import CachedPredictor
from pipelines import train_tokenizer, write_suite

REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = "Reverse the order of the items."
INPUTS = ["fox 3 red owl", "cat dog 7 blue gold"]
MODEL = "hint-registry-test"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def run_cli(*args: str) -> tuple[int, str]:
    """`hint ARGS` in this process: (exit code, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(args))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def trained(mlflow_server, ray_local, tmp_path_factory):
    """`hint train` of a 2-step run logged in through its tracking URI, registered as MODEL."""
    root = tmp_path_factory.mktemp("registry")
    suite = write_suite(root / "data", num_train_tasks=21, num_test_tasks=2, instances_per_task=8,
                        num_pretrain_docs=5)
    train_tokenizer(suite.texts(), root / "tok", vocab_size=200)
    cfg = config.load("demo/finetune").with_overrides({
        "name": "registry-test", "model.init_from": None, "data.tokenizer": str(root / "tok"),
        "data.train": [suite.sni_spec()], "data.eval": [],
        "train.max_steps": 2, "train.global_batch_size": 8, "train.micro_batch_size": 4,
        "run.storage_path": str(root / "runs"), "run.register_as": MODEL,
    })
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    password = mlflow_server.logins["hint"]["MLFLOW_TRACKING_PASSWORD"]
    with pytest.MonkeyPatch.context() as env:
        for var in CREDENTIAL_VARS:
            env.delenv(var, raising=False)
        code, output = run_cli("train", str(path),
                               f"run.tracking_uri=http://hint:{password}@{mlflow_server.uri.split('//')[1]}")
    assert code == 0, output[-3000:]
    summary = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
    return {"config": path, "cfg": cfg, "output": output, "summary": summary, "root": root,
            "password": password, "suite": suite}


@pytest.fixture
def login(mlflow_server, monkeypatch):
    """Log in as `user` through MLFLOW_TRACKING_USERNAME / _PASSWORD (None: no login at all)."""

    def as_user(user: str | None, password: str | None = None) -> None:
        for var in CREDENTIAL_VARS:
            monkeypatch.delenv(var, raising=False)
        if user:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD",
                               password or mlflow_server.logins[user]["MLFLOW_TRACKING_PASSWORD"])

    as_user("hint")
    return as_user


def test_run_and_registration_land_and_the_password_shows_nowhere(trained, mlflow_server, login):
    summary, password = trained["summary"], trained["password"]
    assert summary["registered"] == f"models:/{MODEL}/1"
    run = MlflowClient(mlflow_server.uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "2"
    assert run.data.metrics["step"] == 2
    assert run.data.params["run.tracking_uri"] == f"http://hint:***@{mlflow_server.uri.split('//')[1]}"
    assert password not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    logged = MlflowClient(mlflow_server.uri).download_artifacts(run.info.run_id, "config.json")
    assert password not in Path(logged).read_text()
    assert password not in trained["output"]
    assert "hint:***@" in trained["output"] or "run_dir" in trained["output"]
    files = [p for p in (trained["root"] / "runs").rglob("*") if p.is_file()]
    assert {".distcp", ".safetensors", ".json"} <= {p.suffix for p in files}, files  # checkpoints, export
    holding = [p for p in files if password.encode() in p.read_bytes()]
    assert holding == [], f"the password is in {holding}"


def test_alias_and_a_fresh_process_logged_in_through_the_environment(trained, mlflow_server, login):
    uri = mlflow_server.uri
    registry.set_alias(uri, MODEL, "champion", 1)
    (row,) = registry.list_versions(uri, MODEL)
    assert (row["version"], row["aliases"], row["run_id"]) == (1, ["champion"], trained["summary"]["mlflow_run_id"])

    expected = CachedPredictor(trained["summary"]["export_dir"]).predict([INSTRUCTION] * 2, INPUTS)
    script = (
        "import json, sys, pandas as pd, mlflow.pyfunc\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
        f"df = pd.DataFrame({{'instruction': [{INSTRUCTION!r}] * 2, 'input': {INPUTS!r}}})\n"
        "print(json.dumps(list(model.predict(df))))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **mlflow_server.env("hint")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, cwd=trained["root"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_missing_or_wrong_logins_fail_before_ray_starts(trained, mlflow_server, tmp_path):
    """`hint train` as a fresh process with no Ray around: each refusal names the server and
    the variables to set, shows no secret, and leaves no Ray session behind."""
    wrong = "not-the-password-4711"
    cases = {"none": {}, "wrong": {**mlflow_server.env("hint"), "MLFLOW_TRACKING_PASSWORD": wrong},
             "viewer": mlflow_server.env("viewer")}
    procs = {}
    for name, login_env in cases.items():
        env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS and not k.startswith("RAY_")}
        env.update(login_env, MLFLOW_TRACKING_URI=mlflow_server.uri, RAY_TMPDIR=str(tmp_path / name),
                   PYTHONPATH=str(REPO))
        procs[name] = subprocess.Popen(
            [str(Path(sys.executable).parent / "hint"), "train", str(trained["config"]), "name=refused"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    outputs = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 2, (name, outputs[name][-2000:])
        assert not (tmp_path / name / "ray").exists(), f"{name}: Ray started"
        assert mlflow_server.uri in outputs[name], outputs[name]
    for name in ("none", "wrong"):
        assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in outputs[name], outputs[name]
    assert "requires a login" in outputs["none"]
    assert "refused the login of user 'hint'" in outputs["wrong"] and wrong not in outputs["wrong"]
    assert "'viewer'" in outputs["viewer"] and "may not write to experiment" in outputs["viewer"]
    assert mlflow_server.logins["viewer"]["MLFLOW_TRACKING_PASSWORD"] not in outputs["viewer"]


def test_a_read_only_user_can_read_but_not_register(trained, mlflow_server, login):
    uri = mlflow_server.uri
    login("viewer")
    assert [r["version"] for r in registry.list_versions(uri, MODEL)] == [1]
    with pytest.raises(registry.RegistryError, match="viewer"):
        registry.log_and_register(trained["summary"]["export_dir"], tracking_uri=uri, name=MODEL)
    with pytest.raises(registry.RegistryError, match="cannot point alias"):
        registry.set_alias(uri, MODEL, "champion", 1)
    login("hint")
    assert [r["version"] for r in registry.list_versions(uri, MODEL)] == [1]


TAMPERED_CODE = """\
from pathlib import Path
Path({marker!r}).write_text("the registered model's code ran")
raise SystemExit("tampered model code ran")
"""


def test_hint_loads_a_registered_version_without_running_its_code(trained, mlflow_server, login, tmp_path):
    """Someone with write access to the artifact store replaces the registered version's code
    file. `hint registry load` (a fresh process) and `hint eval` still load the model, from its
    weights, and the code never runs; MLflow's own pyfunc loader does run it (the README says
    what that means)."""
    uri = mlflow_server.uri
    registry.set_alias(uri, MODEL, "champion", 1)
    run_id = MlflowClient(uri).get_model_version(MODEL, "1").run_id
    (code,) = [p.with_name("pyfunc_model.py") for p in (mlflow_server.root / "artifacts").rglob("MLmodel")
               if yaml.safe_load(p.read_text())["run_id"] == run_id]
    marker = tmp_path / "code-ran"
    code.write_text(TAMPERED_CODE.format(marker=str(marker)))
    expected = CachedPredictor(trained["summary"]["export_dir"]).predict([INSTRUCTION] * 2, INPUTS)

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **mlflow_server.env("viewer")}
    load = subprocess.run(
        [str(Path(sys.executable).parent / "hint"), "registry", "load", f"models:/{MODEL}@champion",
         "--instruction", INSTRUCTION, "--input", INPUTS[0], "--input", INPUTS[1]],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert load.returncode == 0, load.stderr[-3000:]
    assert [json.loads(line)["output"] for line in load.stdout.splitlines()] == expected
    assert not marker.exists()

    code_, output = run_cli("eval", f"models:/{MODEL}@champion", str(trained["config"]),
                            f"run.tracking_uri={uri}", "--out", str(tmp_path / "eval"),
                            f"data.eval={json.dumps([trained['suite'].sni_spec(part='test', max_per_task=2)])}")
    assert code_ == 0, output[-3000:]
    assert (tmp_path / "eval" / "metrics.json").is_file() and not marker.exists()

    pyfunc = subprocess.run(
        [sys.executable, "-c", f"import mlflow.pyfunc; mlflow.pyfunc.load_model('models:/{MODEL}@champion')"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert pyfunc.returncode != 0 and marker.exists(), "the tampered code did not run: the test proves nothing"


def test_unknown_names_are_clear_errors(mlflow_server, login, tmp_path):
    with pytest.raises(registry.RegistryError, match="no registered model named 'nope'"):
        registry.list_versions(mlflow_server.uri, "nope")
    with pytest.raises(registry.RegistryError, match="models:/nope@champion"):
        registry.resolve_export("models:/nope@champion", mlflow_server.uri)
    with pytest.raises(registry.RegistryError, match="not a model export"):
        registry.resolve_export(str(tmp_path))
