"""What `hint submit` decides before it contacts a cluster (the job it builds, what it refuses),
what it uploads (Ray's own packaging of this repository), and how it meets addresses that are
not a Ray cluster. The cluster itself: test_submit_cluster.py."""

from __future__ import annotations

import http.server
import json
import shlex
import socket
import threading
import zipfile
from pathlib import Path

import pytest
import yaml

from hint_platform.jobs import submit
from hint_platform.config import ConfigError
from hint_platform.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def write_config(directory: Path, **run) -> Path:
    cfg = {
        "name": "tiny",
        "data": {"tokenizer": "/shared/tok",
                 "train": [{"kind": "sni", "path": "/shared/sni", "format": "def"}]},
        "train": {"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 4},
        "run": {"storage_path": "/shared/runs", **run},
    }
    path = directory / "configs" / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_job_runs_hint_train_on_the_uploaded_config(tmp_path):
    config = write_config(tmp_path)
    request = submit.build_request(config, ["train.max_steps=2"], working_dir=tmp_path, name="exp-1",
                             tracking_uri="http://mlflow:5000", env_vars={"A": "b"})
    assert shlex.split(request.entrypoint) == ["hint", "train", "configs/tiny.yaml",
                                               "train.max_steps=2", "name=exp-1"]
    assert request.runtime_env["working_dir"] == str(tmp_path)
    assert request.runtime_env["env_vars"] == {"A": "b", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert request.metadata == {"hint_run": "exp-1", "hint_config": "configs/tiny.yaml"}
    assert request.submission_id.startswith("hint-exp-1-")
    ids = {submit.build_request(config, [], working_dir=tmp_path).submission_id for _ in range(2)}
    assert len(ids) == 2  # a name can be resubmitted (to resume); job ids stay unique


def test_invalid_config_is_refused_naming_the_key(tmp_path):
    config = write_config(tmp_path)
    with pytest.raises(ConfigError, match="train.max_steps: must be positive"):
        submit.build_request(config, ["train.max_steps=0"], working_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown key train.max_stepz"):
        submit.build_request(config, ["train.max_stepz=3"], working_dir=tmp_path)


def test_config_outside_the_working_dir_is_refused(tmp_path):
    config = write_config(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside the working directory"):
        submit.build_request(config, [], working_dir=tmp_path / "project")


def test_relative_paths_are_refused_until_on_shared_storage(tmp_path):
    """The paper configs use repository-relative paths (runs/, data/, checkpoints/): refused
    as they are, accepted with --shared-dir, which moves every one of them under it."""
    paper = REPO / "hint_platform" / "configs" / "paper" / "hint-3b-sni-def.yaml"
    with pytest.raises(UserError) as refused:
        submit.build_request(paper, [], working_dir=REPO)
    for key in ("run.storage_path='runs'", "data.tokenizer=", "model.init_from=",
                "data.train[0].path='data/natural-instructions'", "data.eval[0].path="):
        assert key in str(refused.value)

    request = submit.build_request(paper, [], working_dir=REPO, shared_dir="/mnt/shared")
    args = dict(a.split("=", 1) for a in shlex.split(request.entrypoint)[3:])
    assert args["run.storage_path"] == "/mnt/shared/runs"
    assert args["model.init_from"] == "/mnt/shared/runs/hint-3b-pretrain-c4/export"
    assert [s["path"] for s in json.loads(args["data.train"])] == ["/mnt/shared/data/natural-instructions"]
    # An object store takes checkpoints, exports and data; a model to start from is read from a
    # directory (test_storage.py): refused before anything is sent, naming the key.
    with pytest.raises(UserError, match="model.init_from=s3://bucket/hint/runs/.*local or mounted directory"):
        submit.build_request(paper, [], working_dir=REPO, shared_dir="s3://bucket/hint")
    request = submit.build_request(paper, ["model.init_from=/mnt/shared/t5", "data.tokenizer=/mnt/shared/t5"],
                                   working_dir=REPO, shared_dir="s3://bucket/hint")
    args = dict(a.split("=", 1) for a in shlex.split(request.entrypoint)[3:])
    assert args["run.storage_path"] == "s3://bucket/hint/runs"
    assert [s["path"] for s in json.loads(args["data.train"])] == ["s3://bucket/hint/data/natural-instructions"]
    with pytest.raises(UserError, match="--shared-dir shared: expected an absolute path"):
        submit.build_request(paper, [], working_dir=REPO, shared_dir="shared")


def test_submit_checks_the_model_then_the_address_whatever_the_order(tmp_path, capsys):
    """Options and overrides in any order; the model section fails before the address is
    tried, a good config reaches the address and is refused there."""
    from hint_platform.cli import main

    config = str(write_config(tmp_path))
    address = ["--address", f"http://127.0.0.1:{free_port()}", "--working-dir", str(tmp_path)]
    assert main(["submit", config, *address, "model.variant=typo"]) == 2
    assert "hint submit: error: model: unknown variant 'typo'" in capsys.readouterr().err
    assert main(["submit", config, *address, "train.max_steps=2"]) == 2
    assert "cannot reach a Ray cluster at http://127.0.0.1:" in capsys.readouterr().err


def test_upload_leaves_out_virtualenvs_outputs_and_data(tmp_path):
    """Ray's own packaging of this repository with our excludes (and no help from .gitignore)."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / "pkg.zip"
    create_package(str(REPO), target, include_gitignore=False, excludes=submit.WORKING_DIR_EXCLUDES)
    names = zipfile.ZipFile(target).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert not tops & {".venv", ".git", "runs", "mlruns", "data"}
    assert not [n for n in names if "__pycache__" in n or ".egg-info" in n]
    assert {"hint_platform/jobs/submit.py", "hint_platform/configs/paper/hint-3b-sni-def.yaml", "pyproject.toml"} <= set(names)
    assert target.stat().st_size < 20 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_refused():
    with pytest.raises(UserError, match=r"cannot reach a Ray cluster at http://127.0.0.1:\d+"):
        submit.connect(f"127.0.0.1:{free_port()}", timeout_s=5)
    with pytest.raises(UserError, match="expected the dashboard's http"):
        submit.connect("ray://127.0.0.1:10001")


def test_a_server_that_is_not_ray_is_refused(tmp_path):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match="does not answer as a Ray dashboard .*HTTP 404"):
            submit.connect(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_token_comes_from_env_then_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert submit.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-file\n")
    assert submit.auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_headers() == {"Authorization": "Bearer from-env"}


PASSWORD = "pw-for-the-job-0123"


def test_no_login_travels_with_the_job(tmp_path, monkeypatch):
    """The job logs in as the cluster's nodes do (their secret store); the login set here stays
    here, and a secret in the tracking URI or an --env variable is refused, naming where it
    belongs. The Jobs API shows a job's runtime env to everyone: test_submit_cluster.py."""
    config = write_config(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "hint")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    request = submit.build_request(config, [], working_dir=tmp_path, tracking_uri="https://mlflow.internal")
    assert request.runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "https://mlflow.internal"}
    assert PASSWORD not in json.dumps(request.runtime_env) + request.entrypoint + json.dumps(request.metadata)
    # No tracking URI from here: the cluster's own MLflow settings (and login) apply.
    assert submit.build_request(config, [], working_dir=tmp_path).runtime_env["env_vars"] == {}
    for kwargs, where in (({"tracking_uri": f"http://hint:{PASSWORD}@mlflow:5000"}, "the tracking URI"),
                          ({"env_vars": {"HF_TOKEN": PASSWORD}}, "--env"),
                          ({"env_vars": {"MLFLOW_TRACKING_PASSWORD": PASSWORD}}, "--env"),
                          ({"env_vars": {"PGPASSWORD": PASSWORD}}, "--env")):
        with pytest.raises(UserError, match=f"{where}: holds a secret") as e:
            submit.build_request(config, [], working_dir=tmp_path, **kwargs)
        assert PASSWORD not in str(e.value) and "hint-mlflow-client" in str(e.value)
    for flag in ([f"--token={PASSWORD}"], ["--token", PASSWORD]):
        with pytest.raises(UserError, match="the command: holds a secret"):
            submit.command_request(["predict", "m", "x.jsonl", *flag], working_dir=tmp_path,
                                   run_name="predict")


@pytest.mark.parametrize("override", [
    f"run.tracking_uri=http://hint:{PASSWORD}@mlflow:5000",
    f"run.tracking_uri=https://mlflow:5000/?token={PASSWORD}",
])
def test_a_secret_in_the_entrypoint_is_refused(tmp_path, override):
    config = write_config(tmp_path)
    with pytest.raises(UserError, match="run.tracking_uri: a secret in the job's config") as e:
        submit.build_request(config, [override], working_dir=tmp_path)
    assert PASSWORD not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)
    in_file = write_config(tmp_path, tracking_uri=f"http://hint:{PASSWORD}@mlflow:5000")
    with pytest.raises(UserError, match="run.tracking_uri: a secret"):
        submit.build_request(in_file, [], working_dir=tmp_path)


def test_dry_run_prints_the_job_and_refuses_a_secret(tmp_path, monkeypatch, capsys):
    from hint_platform import cli

    config = write_config(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "hint")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    argv = ["submit", str(config), "--working-dir", str(tmp_path), "--dry-run",
            "--tracking-uri", "http://mlflow:5000"]
    assert cli.main([*argv, "--env", "HF_HOME=/mnt/shared/hf"]) == 0
    out = capsys.readouterr().out
    job = json.loads(out)
    assert job["runtime_env"]["env_vars"] == {"HF_HOME": "/mnt/shared/hf", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert PASSWORD not in out and job["entrypoint"] == "hint train configs/tiny.yaml"
    assert cli.main([*argv, "--env", f"HF_TOKEN={PASSWORD}x"]) == 2
    captured = capsys.readouterr()
    assert "--env: holds a secret" in captured.err and PASSWORD not in captured.err + captured.out


def test_jobs_run_sends_another_hint_command(tmp_path, monkeypatch, capsys):
    """`hint predict` (or any command but training) goes to a cluster through `hint jobs run`,
    with the same working directory, tracking URI and login as `hint submit`."""
    from hint_platform import cli

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "hint")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    argv = ["predict", "models:/hint@champion", "/mnt/shared/tasks.jsonl", "--output", "/mnt/shared/p"]
    assert cli.main(["jobs", "run", "--dry-run", "--working-dir", str(tmp_path),
                     "--tracking-uri", "http://mlflow:5000", "--", *argv]) == 0
    out = capsys.readouterr().out
    job = json.loads(out)
    assert shlex.split(job["entrypoint"]) == ["hint", *argv]
    assert job["runtime_env"]["working_dir"] == str(tmp_path)
    assert job["runtime_env"]["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert PASSWORD not in out
    for refused, message in (([], "needs a command"), (["train", "x.yaml"], "use `hint submit CONFIG`")):
        assert cli.main(["jobs", "run", "--dry-run", "--", *refused]) == 2
        assert message in capsys.readouterr().err


def test_an_unexpected_error_prints_its_traceback_without_the_password(tmp_path):
    """MLflow's and requests' errors name the URL they failed on: `hint` masks its password in
    the traceback of an error it did not expect (the process's excepthook)."""
    import subprocess
    import sys

    url = f"http://hint:{PASSWORD}@127.0.0.1:1/api/2.0/mlflow/runs/get"
    code = ("import sys\n"
            "from hint_platform import cli\n"
            "from hint_platform.cli import configs\n"
            "def fail(args):\n"
            f"    raise ConnectionError('API request to {url} failed')\n"
            "configs.run = fail\n"
            "sys.exit(cli.main(['configs']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and "ConnectionError: API request to http://hint:***@127.0.0.1:1" in done.stderr
    assert PASSWORD not in done.stderr + done.stdout
