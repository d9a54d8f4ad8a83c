"""What `hint` starts listens on loopback and says where: the Ray dashboard of a local Ray."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def test_the_ray_dashboard_hint_starts_listens_on_loopback_and_says_where():
    script = textwrap.dedent("""
        import re, socket, sys
        from hint_platform.training.driver import start_ray
        start_ray(num_cpus=1)
        sys.stdout.flush()
        input()  # hold Ray up until the test has looked
    """)
    root = Path(tempfile.mkdtemp(prefix="hint-listen-"))  # Ray's socket paths: 107 bytes at most
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(root), HOME=str(root), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ray dashboard:") or len(lines) > 200:
                break
        found = re.match(r"Ray dashboard: http://127\.0\.0\.1:(\d+)$", lines[-1].strip())
        assert found, "".join(lines)[-2000:]
        port = int(found.group(1))
        assert answers("127.0.0.1", port)
        address = outward_address()
        if address:
            assert not answers(address, port), f"the dashboard answers on {address}:{port}"
    finally:
        proc.communicate(input="\n", timeout=120)
        shutil.rmtree(root, ignore_errors=True)
