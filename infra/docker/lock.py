"""Writes infra/docker/requirements.lock from a pip installation report of this package:

    pip install --dry-run --ignore-installed --report report.json .    (repository root)
    python infra/docker/lock.py report.json

Every package of the closure of pyproject.toml's dependencies (no extras: no test tools in the
image) at the exact version pip chose. A local version label (`torch==2.13.0+cpu`, from a CPU
index) is dropped: the image takes the same release from PyPI, built for CUDA.
"""

import json
import sys
from pathlib import Path

LOCK = Path(__file__).with_name("requirements.lock")
HEADER = """\
# The image's dependencies, each at an exact version: the closure of `pip install .`
# (pyproject.toml's dependencies, no test extra) for CPython 3.11 on Linux x86_64, written by
# infra/docker/lock.py (its docstring: how to regenerate). infra/docker/Dockerfile installs it.
# No hashes (pip's --require-hashes): torch's wheel of the same version differs between the CPU
# index the project's test machines use and PyPI's CUDA build the image installs.
"""


def main(report_path: str) -> None:
    report = json.loads(Path(report_path).read_text())
    pins = sorted((item["metadata"]["name"], item["metadata"]["version"].split("+")[0])
                  for item in report["install"] if item["metadata"]["name"] != "hint")
    LOCK.write_text(HEADER + "".join(f"{name}=={version}\n"
                                     for name, version in sorted(pins, key=lambda p: p[0].lower())))


if __name__ == "__main__":
    main(sys.argv[1])
