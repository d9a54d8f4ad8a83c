"""infra/ holds together: every manifest parses, every RayJob entrypoint is a `hint train` of a
config of this repository that validates (a dry run of the real CLI) and touches only shared
storage, the clusters have the GPUs and volumes those configs ask for, and the image installs
the package with the same pip command as the Makefile."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from hint_platform import cli, config
from hint_platform.jobs import submit

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
YAMLS = sorted(INFRA.rglob("*.yaml"))
IMAGE_ROOT = "/app"  # the Dockerfile's WORKDIR, where the repository sits in the image


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kube(kind: str) -> dict[str, dict]:
    found = {}
    for path in YAMLS:
        for doc in documents(path):
            if doc.get("kind") == kind:
                found[doc["metadata"]["name"]] = doc
    return found


def train_commands(entrypoint: str) -> list[list[str]]:
    """`hint train CONFIG overrides...` commands of a shell entrypoint joined with &&."""
    words = shlex.split(entrypoint.replace("\\\n", " "))
    commands, current = [], []
    for word in words + ["&&"]:
        if word == "&&":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path):
    docs = documents(path)
    assert docs, f"{path} is empty"
    if path.parent.name in ("kuberay", "mlflow") and path.name != "compose.yaml":
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path


def test_paper_rayjobs_run_valid_configs_on_shared_storage(capsys):
    jobs = kube("RayJob")
    assert set(jobs) == {"hint-3b-paper", "hint-11b-paper"}
    clusters = kube("RayCluster")
    for name, job in jobs.items():
        cluster = clusters[job["spec"]["clusterSelector"]["ray.io/cluster"]]
        gpus = sum(int(g["replicas"]) * int(_container(g)["resources"]["limits"]["nvidia.com/gpu"])
                   for g in cluster["spec"]["workerGroupSpecs"])
        commands = train_commands(job["spec"]["entrypoint"])
        assert [c[:2] for c in commands] == [["hint", "train"]] * 2, name
        for _, _, shipped, *overrides in commands:
            assert shipped in config.shipped_configs(), f"{name}: {shipped} is no shipped config"
            path = config.find(shipped)
            assert cli.main(["train", "--dry-run", str(path), *overrides]) == 0
            assert "storage_path: /mnt/shared/runs" in capsys.readouterr().out
            cfg = config.load(path, overrides)
            assert submit.unshared_paths(cfg) == [], name
            assert cfg.train.use_gpu and cfg.train.num_workers == gpus, name


def _container(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container


def test_clusters_mount_shared_storage_use_token_auth_and_the_team_mlflow():
    service = kube("Service")["mlflow"]
    tracking = (f"http://{service['metadata']['name']}.{service['metadata']['namespace']}"
                f".svc.cluster.local:{service['spec']['ports'][0]['port']}")
    claims = kube("PersistentVolumeClaim")
    for name, cluster in kube("RayCluster").items():
        spec = cluster["spec"]
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["rayVersion"] == "2.60.0"
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in _container(group)["volumeMounts"]}
            claim = volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"]
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], name
            env = {e["name"]: e.get("value") for e in _container(group)["env"]}
            assert env["MLFLOW_TRACKING_URI"] == tracking, name
    workers = {n: c["spec"]["workerGroupSpecs"][0]["replicas"] for n, c in kube("RayCluster").items()}
    assert workers["hint-3b"] == 1 and workers["hint-11b"] > 1


def test_configs_named_in_infra_docs_exist():
    text = "\n".join(p.read_text() for p in [*YAMLS, INFRA / "README.md", REPO / "README.md"])
    named = set(re.findall(r"\bhint (?:train|submit) ([\w.-]+/[\w/.-]+)", text))
    assert named, "infra names no config"
    for name in named:
        assert name in config.shipped_configs(), name


def pip_install(line: str) -> str:
    return re.sub(r"^\S*pip ", "pip ", line.strip())


def test_image_installs_like_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    target = makefile.split("\ninstall:", 1)[1].split("\n\n", 1)[0]
    (make_pip,) = [pip_install(l) for l in target.splitlines() if "pip install" in l]
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    (image_pip,) = [pip_install(l.removeprefix("RUN ")) for l in dockerfile.splitlines()
                    if l.startswith("RUN") and "pip install" in l]
    assert image_pip == make_pip == "pip install -q -e '.[test]'"
    assert f"WORKDIR {IMAGE_ROOT}" in dockerfile
    copied = {w for l in dockerfile.splitlines() if l.startswith("COPY")
              for w in l.split()[1:-1] if not w.startswith("--")}
    for source in copied:
        assert (REPO / source).exists(), source
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r"include = \[(.*?)\]", pyproject).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert package in copied, f"package {package} is not copied into the image"


def test_mlflow_server_matches_the_clients_version():
    pinned = re.search(r'"mlflow==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"mlflow:v{pinned}" in (INFRA / "mlflow" / "Dockerfile").read_text()
    compose = documents(INFRA / "mlflow" / "compose.yaml")[0]["services"]["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in compose and "--artifacts-destination s3://" in compose
    (server,) = [c for c in kube("Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]]
    args = " ".join(server["command"])
    assert "--backend-store-uri=postgresql://" in args and "--artifacts-destination=s3://" in args
