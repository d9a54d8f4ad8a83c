"""Where a run's files live: a directory of this machine (a shared mount included) or an object
store (`s3://bucket/prefix`, `gs://bucket/prefix`), read and written through `pyarrow.fs`.

Ray Train writes checkpoints to either itself (`RunConfig(storage_path=...)` takes a URI); the
platform's own files of a run (the export, the train state a resume reads) go through the few
functions here. An object store's endpoint and credentials come from the environment, as
pyarrow's and the cloud SDKs' default chains find them (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
an instance role, ...): never from a config.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from hint_platform.errors import UserError

REMOTE_SCHEMES = ("s3", "gs")


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def check_uri(location: str, where: str) -> str:
    """`location` without a trailing slash; UserError for a scheme other than s3:// or gs://."""
    scheme = location.split("://", 1)[0]
    if scheme not in REMOTE_SCHEMES:
        raise UserError(f"{where}={location}: unsupported scheme {scheme}:// (use a local or "
                        "mounted path, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX)")
    return location.rstrip("/")


def read_bytes(location: str | Path) -> bytes | None:
    """The content of a file, local or remote; None if it does not exist."""
    if not is_uri(location):
        path = Path(location)
        return path.read_bytes() if path.is_file() else None
    fs, path = pafs.FileSystem.from_uri(str(location))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


@contextmanager
def local_dir(location: str | Path, *, upload: bool = True) -> Iterator[Path]:
    """A local directory to write `location`'s files into: `location` itself when it is local;
    for a URI a temporary directory, copied there when the block ends without an error (and
    `upload`: on one rank of several)."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="hint-upload-") as tmp:
        yield Path(tmp)
        if upload:
            fs, path = pafs.FileSystem.from_uri(str(location))
            fs.create_dir(path)
            pafs.copy_files(tmp, path, destination_filesystem=fs)
