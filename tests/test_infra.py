"""infra/ holds together: every manifest parses, every RayJob entrypoint is a `hint train` of a
config of this repository that validates (a dry run of the real CLI) and touches only shared
storage, the clusters have the GPUs and volumes those configs ask for, the image installs the
locked dependencies and no test tools, every pod runs unprivileged on a read-only root, every
image is pinned, and the namespace denies every connection it does not allow. Parsed, not run
(no Docker or Kubernetes here)."""

from __future__ import annotations

import re
import shlex
import subprocess
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


def dockerfile_steps(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    steps = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, args = line.strip().partition(" ")
            steps.append((instruction.upper(), args.strip()))
    return steps


LOCK = INFRA / "docker" / "requirements.lock"


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[\w.!]+", version), f"not an exact pin: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_image_installs_the_lock_and_no_test_tools():
    """The image installs the package's dependencies from requirements.lock (each at an exact
    version), then the package as a wheel; no test extra, no editable install."""
    steps = dockerfile_steps(INFRA / "docker" / "Dockerfile")
    installs = [args for kind, args in steps if kind == "RUN" and "pip install" in args]
    assert len(installs) == 2, installs
    assert "-r /tmp/requirements.lock" in installs[0]
    assert "--no-deps /tmp/wheels/*.whl" in installs[1]
    assert ("COPY", "infra/docker/requirements.lock /tmp/requirements.lock") in steps
    assert not [a for a in installs if "[test]" in a or " -e " in a or "pytest" in a]
    pins = locked()
    assert len(pins) > 100 and not {"pytest", "pytest-timeout", "moto", "hint"} & set(pins)
    pyproject = (REPO / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    for requirement in re.findall(r'^\s*"([^"]+)"', dependencies, re.M):
        name = re.match(r"[\w.-]+", requirement).group(0).lower()
        assert name in pins, f"{name} of pyproject.toml is not in the lock"
        exact = re.search(r"==([\w.]+)", requirement)
        assert not exact or pins[name] == exact.group(1), (name, pins[name], requirement)


def test_image_sources_belong_to_root_and_the_job_user_is_not_root():
    steps = dockerfile_steps(INFRA / "docker" / "Dockerfile")
    final = steps[max(i for i, (kind, _) in enumerate(steps) if kind == "FROM"):]
    assert ("WORKDIR", IMAGE_ROOT) in final
    user = None
    copied = set()
    for kind, args in final:
        if kind == "USER":
            user = args
        if kind == "COPY" and not args.startswith("--from"):
            words = args.split()
            assert not [w for w in words if w.startswith("--chown")], args
            copied |= set(words[:-1])
            if words[-1].startswith(("./", IMAGE_ROOT)):
                assert user == "root", f"{args}: copied into {IMAGE_ROOT} as {user}"
    assert user == "ray", "the image's last USER is the job user, not root"
    for source in copied:
        assert (REPO / source).exists(), source
    packages = re.search(r"include = \[(.*?)\]", (REPO / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert package in copied, f"package {package} is not copied into the image"
    mlflow_steps = dockerfile_steps(INFRA / "mlflow" / "Dockerfile")
    assert mlflow_steps[-1] == ("USER", "10001"), "the MLflow image ends as root"


def images() -> list[tuple[str, str]]:
    """(where, image) of every image the infra names: pods, compose services, cluster launcher,
    Dockerfiles."""
    found = []

    def walk(where, node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "image" and isinstance(value, str):
                    found.append((where, value))
                else:
                    walk(where, value)
        elif isinstance(node, list):
            for value in node:
                walk(where, value)

    for path in YAMLS:
        for doc in documents(path):
            walk(path.name, doc)
    for path in INFRA.rglob("Dockerfile"):
        found += [(str(path.relative_to(INFRA)), args.split()[0])
                  for kind, args in dockerfile_steps(path) if kind == "FROM"]
    return found


def test_every_image_is_pinned_by_digest_or_exact_version():
    found = images()
    assert len(found) > 10
    for where, image in found:
        if "@sha256:" in image:
            continue
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        # An exact release: 2.60.0-py311-cu128, v3.17.2, PostgreSQL's 16.9, MinIO's RELEASE.<date>.
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[\w.-]+)?|RELEASE\.[\dTZ-]+", tag), \
            f"{where}: {image} is not pinned"


def pod_templates() -> dict[str, dict]:
    """Every pod the manifests start, by name: RayCluster groups, Deployments, StatefulSets, Jobs."""
    pods = {}
    for name, cluster in kube("RayCluster").items():
        spec = cluster["spec"]
        pods[f"{name}/head"] = spec["headGroupSpec"]["template"]
        for group in spec["workerGroupSpecs"]:
            pods[f"{name}/{group['groupName']}"] = group["template"]
    for kind in ("Deployment", "StatefulSet", "Job"):
        for name, doc in kube(kind).items():
            pods[f"{kind}/{name}"] = doc["spec"]["template"]
    return pods


def test_every_pod_runs_unprivileged_on_a_read_only_root():
    pods = pod_templates()
    assert len(pods) == 7, sorted(pods)
    for name, template in pods.items():
        pod = template["spec"]
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) > 0, name
        assert security.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, name
            assert context.get("capabilities", {}).get("drop") == ["ALL"], name
            assert context.get("readOnlyRootFilesystem") is True, name
            mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in container.get("volumeMounts", [])}
            assert "emptyDir" in mounts.get("/tmp", {}), f"{name}: no writable /tmp"
            if name.startswith("hint-"):  # Ray pods: the libraries' caches too
                assert "emptyDir" in mounts["/home/ray/.cache"], name


def reachable(target: dict[str, str], source: dict[str, str], source_namespace: str, port: int) -> bool:
    """Whether a pod with labels `source` in `source_namespace` may open a connection to port
    `port` of a pod with labels `target` in namespace hint, under every NetworkPolicy here
    (Kubernetes' semantics: a pod no policy selects admits everything; one that some policy
    selects admits what one of them allows)."""
    selecting = [p for p in kube("NetworkPolicy").values()
                 if p["metadata"]["namespace"] == "hint" and "Ingress" in p["spec"]["policyTypes"]
                 and selects(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if (not ports or port in ports) and admitted({"metadata": policy["metadata"],
                                                          "spec": {"ingress": [rule]}},
                                                         source, source_namespace):
                return True
    return False


def test_the_namespace_denies_by_default_and_allows_only_what_ray_needs():
    (deny,) = [p for p in kube("NetworkPolicy").values() if p["spec"]["podSelector"] == {}]
    assert deny["metadata"]["namespace"] == "hint" and "Ingress" in deny["spec"]["policyTypes"]
    assert not deny["spec"].get("ingress")
    other = {"app": "something-else"}
    assert not reachable(other, other, "hint", 80)  # a pod no one allowed: nothing reaches it
    for name in kube("RayCluster"):
        head = {"ray.io/cluster": name, "ray.io/node-type": "head"}
        worker = {"ray.io/cluster": name, "ray.io/node-type": "worker"}
        stranger = {"ray.io/cluster": "hint-11b" if name == "hint-3b" else "hint-3b",
                    "ray.io/node-type": "worker"}
        for port in (6379, 8265, 10002):  # GCS, dashboard, a worker port
            assert reachable(head, worker, "hint", port) and reachable(worker, head, "hint", port)
            assert not reachable(head, worker, "default", port), (name, port)
            assert not reachable(worker, stranger, "hint", port), (name, port)
        for port in (8000, 8265):  # Serve and the dashboard: the namespace only
            assert reachable(head, other, "hint", port) and not reachable(head, other, "default", port)
        assert not reachable(head, other, "hint", 6379) and not reachable(worker, other, "hint", 8000)


COMPOSE = INFRA / "mlflow" / "compose.yaml"


def compose_services() -> dict[str, dict]:
    return documents(COMPOSE)[0]["services"]


def with_defaults(text: str) -> str:
    """Compose's interpolation with no variable set: `${X:-default}` -> default, `${X}` -> ''."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


def mlflow_server_commands() -> dict[str, str]:
    compose = compose_services()["mlflow"]["command"]
    (server,) = kube("Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    return {"compose": " ".join(compose).replace("=", " "),
            "kubernetes": " ".join(server["command"]).replace("=", " ")}


def test_mlflow_server_matches_the_clients_version():
    pinned = re.search(r'"mlflow\[auth\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow:v{pinned}" in dockerfile and f'"mlflow[auth]=={pinned}"' in dockerfile
    for where, args in mlflow_server_commands().items():
        assert "--backend-store-uri postgresql://" in args and "--artifacts-destination s3://" in args, where


def test_mlflow_server_lets_no_one_in_without_a_password():
    """basic-auth in both variants; no password in any command line or committed file; the
    admin's from a secret; the Ray pods log in as `hint` with a password from a Secret."""
    for where, args in mlflow_server_commands().items():
        assert "--app-name basic-auth" in args, where
        uris = re.findall(r"\w+://\S+", args)
        assert uris and not [u for u in uris if re.match(r"\w+://[^/@\s]*:[^/@\s]*@", u)], (where, uris)
    ini = (INFRA / "mlflow" / "basic_auth.ini").read_text()
    assert "default_permission = NO_PERMISSIONS" in ini and "admin_password" not in ini
    assert "COPY basic_auth.ini" in (INFRA / "mlflow" / "Dockerfile").read_text()

    compose = documents(COMPOSE)[0]
    assert "/run/secrets/mlflow_admin_password" in " ".join(compose["services"]["mlflow"]["command"])
    for name, secret in compose["secrets"].items():
        path = COMPOSE.parent / secret["file"]
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
        assert ignored.returncode == 0, f"secret {name} ({path}) is not git-ignored"
    (server,) = kube("Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "hint-mlflow"
    assert "hint" in kube("Job")["mlflow-users"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]

    for name, cluster in kube("RayCluster").items():
        spec = cluster["spec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            env = {e["name"]: e for e in _container(group)["env"]}
            assert env["MLFLOW_TRACKING_USERNAME"]["value"] == "hint", name
            password = env["MLFLOW_TRACKING_PASSWORD"]
            assert "value" not in password, name
            assert password["valueFrom"]["secretKeyRef"]["name"] == "hint-mlflow-client", name


def test_compose_publishes_nothing_on_every_interface_by_default():
    published = []
    for name, service in compose_services().items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                published.append((name, port.get("host_ip", ""), port.get("published")))
            else:
                parts = with_defaults(str(port)).split(":")
                published.append((name, parts[0] if len(parts) == 3 else "", parts[-2:]))
    assert published, "the MLflow server is published nowhere"
    for name, host_ip, port in published:
        assert host_ip == "127.0.0.1", f"service {name} publishes {port} on {host_ip or 'every interface'}"
    assert "${MLFLOW_BIND:-127.0.0.1}:5000:5000" in compose_services()["mlflow"]["ports"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, op = labels.get(e["key"]), e["operator"]
        if ((op == "In" and value not in e["values"]) or (op == "NotIn" and value in e["values"])
                or (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None)):
            return False
    return True


def admitted(policy: dict, labels: dict[str, str], namespace: str) -> bool:
    """Whether a pod with `labels` in `namespace` may open a connection under `policy`."""
    for rule in policy["spec"].get("ingress", []):
        for peer in rule.get("from", []):
            pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector")
            same_ns = namespace == policy["metadata"]["namespace"]
            ns_ok = (selects(namespaces, {"kubernetes.io/metadata.name": namespace})
                     if namespaces is not None else same_ns)
            if ns_ok and (pods is None or selects(pods, labels)):
                return True
    return False


def test_mlflow_is_cluster_internal_and_admits_only_the_ray_pods():
    service = kube("Service")["mlflow"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    server_labels = kube("Deployment")["mlflow"]["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in kube("NetworkPolicy").values()
                if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], server_labels)]
    assert len(policies) == 1, "no NetworkPolicy (or more than one) admits to the MLflow server"
    (policy,) = policies
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for name, cluster in kube("RayCluster").items():
        spec = cluster["spec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            # The labels KubeRay puts on every pod of the cluster, and the template's own.
            labels = {"ray.io/cluster": name, **group["template"].get("metadata", {}).get("labels", {})}
            assert admitted(policy, labels, cluster["metadata"]["namespace"]), name
    users = kube("Job")["mlflow-users"]["spec"]["template"]["metadata"]["labels"]
    assert admitted(policy, users, "hint")
    assert admitted(policy, {}, "ingress-nginx")
    for labels, namespace in (({"app": "other"}, "hint"), ({"ray.io/cluster": "someone-else"}, "hint"),
                              ({"ray.io/cluster": "hint-3b"}, "default"), ({}, "default")):
        assert not admitted(policy, labels, namespace), (labels, namespace)
    postgres = [p for p in kube("NetworkPolicy").values()
                if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], {"app": "mlflow-postgres"})]
    assert postgres and admitted(postgres[0], server_labels, "hint")
    assert not admitted(postgres[0], {"ray.io/cluster": "hint-3b"}, "hint")


def test_browsers_reach_mlflow_through_tls_only():
    (ingress,) = kube("Ingress").values()
    hosts = [r["host"] for r in ingress["spec"]["rules"]]
    tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    assert hosts and set(hosts) <= tls_hosts
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"
    args = mlflow_server_commands()["kubernetes"]
    for host in hosts:
        assert host in args, f"--allowed-hosts refuses the Ingress host {host}"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "mlflow"
