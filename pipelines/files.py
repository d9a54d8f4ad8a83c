"""Opening corpus files: local paths, globs, and anything pyarrow's filesystems know (s3://, gs://).

Lines are read as bytes and decoded here, so that a non-UTF-8 byte or a truncated gzip stream
becomes a bad record that names the file and the line, not a traceback from deep in a reader.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from typing import IO

import pyarrow.fs

from pipelines.bad_records import BadRecords


def _is_uri(path: str) -> bool:
    """A URI goes through pyarrow's filesystems (file:// too, which is how tests exercise them)."""
    return "://" in path


def _fs(path: str):
    return pyarrow.fs.FileSystem.from_uri(path)  # -> (filesystem, path inside it)


def expand(pattern: str) -> list[str]:
    """The files a path or glob names, sorted (so a run reads them in a fixed order)."""
    if not _is_uri(pattern):
        if glob.has_magic(pattern):
            return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        return [pattern] if os.path.isfile(pattern) else []
    fs, inner = _fs(pattern)
    scheme = pattern.split("://", 1)[0]
    if not glob.has_magic(inner):
        info = fs.get_file_info(inner)
        return [pattern] if info.type == pyarrow.fs.FileType.File else []
    base = inner.split("*", 1)[0].rsplit("/", 1)[0]
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
    return sorted(f"{scheme}://{i.path}" for i in infos
                  if i.type == pyarrow.fs.FileType.File and fnmatch.fnmatch(i.path, inner))


def exists(path: str) -> bool:
    if not _is_uri(path):
        return os.path.exists(path)
    fs, inner = _fs(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if _is_uri(base) else os.path.join(base, *parts)


def open_binary(path: str) -> IO[bytes]:
    """A binary stream of the file's content, gunzipped when the name ends in .gz."""
    if _is_uri(path):
        fs, inner = _fs(path)
        # compression=None: we gunzip ourselves, so errors name the file and line the same way.
        raw: IO[bytes] = io.BufferedReader(fs.open_input_stream(inner, compression=None))
    else:
        raw = open(path, "rb")
    return gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw


def read_text(path: str, bad: BadRecords) -> str | None:
    """The whole file as text, or None when it is a bad record (reported: non-UTF-8 names the line)."""
    try:
        with open_binary(path) as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        bad.report(path, f"corrupt or truncated gzip stream ({e})")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.report(path, _not_utf8(data, e), 1 + data[: e.start].count(b"\n"))
        return None


def read_lines(path: str, bad: BadRecords, start: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset after the line, text) for every non-blank line, from `start`
    on: (a byte offset of the decompressed content, the number of lines before it), as an
    earlier read gave them, so that a reader resumes without decoding what came before (a gzip
    stream is still decompressed up to the offset). A line that is not UTF-8 is a bad record; a
    truncated or corrupt gzip stream is one bad record that ends the file."""
    offset, lineno = start
    with open_binary(path) as f:
        try:
            _skip(f, offset)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            bad.report(path, f"corrupt or truncated gzip stream ({e})", lineno + 1)
            return
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
                bad.report(path, f"corrupt or truncated gzip stream ({e})", lineno + 1)
                return
            lineno += 1
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                yield lineno, offset, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.report(path, _not_utf8(raw, e), lineno)


def _skip(f: IO[bytes], offset: int) -> None:
    if f.seekable():
        f.seek(offset)
        return
    while offset:
        data = f.read(min(offset, 1 << 20))
        if not data:
            raise EOFError(f"the file ends before byte {offset}")
        offset -= len(data)


def read_json_objects(path: str, bad: BadRecords, start: tuple[int, int] = (0, 0)
                      ) -> Iterator[tuple[int, int, dict]]:
    """(line number, byte offset after the line, object) for every JSON-object line from
    `start` on (read_lines); any other line is a bad record."""
    for lineno, offset, line in read_lines(path, bad, start):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.report(path, f"invalid JSON: {e.msg} (column {e.colno})", lineno)
            continue
        if not isinstance(obj, dict):
            bad.report(path, "a line is a JSON object", lineno)
            continue
        yield lineno, offset, obj


def _not_utf8(data: bytes, e: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
