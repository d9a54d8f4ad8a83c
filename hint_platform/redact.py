"""Secrets out of everything the platform writes or prints: MLflow params, printed configs, job
entrypoints, error messages, files in the run directory.

What counts as a secret:
- the password of a URI (`scheme://user:password@host` -> `scheme://user:***@host`);
- the value of any mapping key, `KEY=value` assignment or URI query parameter whose name has a
  word such as password, secret, token, credentials, api key, private key or authorization
  (`MLFLOW_TRACKING_PASSWORD`, `aws_secret_access_key`, `?token=...`; not `tokenizer` or
  `max_new_tokens`: the name is split into words, and only whole words count);
- the credentials after `Bearer` or `Basic` (an Authorization header);
- any literal value the caller names (the values of the process's secret variables, say: a
  password printed in a form no rule above recognises is still masked).

Pure: no I/O, no Ray or MLflow import. Callers decide what to redact and where.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "token",
                 "credential", "credentials", "apikey", "authorization", "cookie"}
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "token"), ("auth", "token")}
# Names that contain such a word and are not secrets: the shell's working directories.
_NOT_SECRETS = {"PWD", "OLDPWD"}
# Word boundaries of a key name: separators, and lower->upper case changes (camelCase).
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_NAME = r"[A-Za-z_][\w.-]*"
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):(?P<secret>[^/\s@]+)@")
# `KEY=value`, a quoted `"key": value` (JSON, Python reprs) or a YAML line `key: value`; a bare
# `word: value` inside prose is left alone ("refused MLFLOW_TRACKING_TOKEN: wrong ...").
_ASSIGNMENT = re.compile(
    rf"""(?P<head>(?P<q>["'])(?P<quoted>{_NAME})(?P=q)\s*[:=]\s*|(?P<bare>{_NAME})=|"""
    rf"""^[ \t-]*(?P<yaml>{_NAME}):[ \t]+)"""
    rf"""(?P<secret>"[^"]*"|'[^']*'|[^\s&,;'"}}\]\)]+)""", re.M)
_AUTH_HEADER = re.compile(r"(?P<head>\b(?:Bearer|Basic)\s+)(?P<secret>[A-Za-z0-9._~+/=-]{6,})")


def is_secret_key(name: str) -> bool:
    """Whether a key or variable name names a secret: one of its words is password, token, ..."""
    if str(name) in _NOT_SECRETS:
        return False
    words = [w.lower() for w in _WORD_SPLIT.split(str(name)) if w]
    return (any(w in _SECRET_WORDS for w in words)
            or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:])))


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret it shows replaced by ***."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _AUTH_HEADER.sub(lambda m: m["head"] + MASK, text)
    return _ASSIGNMENT.sub(_masked_assignment, text)


def _masked_assignment(m: re.Match) -> str:
    # "Authorization: Bearer ***": the scheme stays, the header rule masked what follows it.
    key = m["quoted"] or m["bare"] or m["yaml"]
    if not is_secret_key(key) or m["secret"].strip("\"'") in ("", MASK, "Bearer", "Basic"):
        return m.group(0)
    quote = m["secret"][0] if m["secret"][0] in "\"'" else ""
    return f"{m['head']}{quote}{MASK}{quote}"


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of `value` (mappings, lists, tuples, strings, nested) with secrets masked: the
    value of a key named like a secret becomes *** whatever it is (None and empty stay)."""
    secrets = tuple(secrets)
    if isinstance(value, Mapping):
        return {k: MASK if is_secret_key(k) and v not in (None, "") else redact(v, secrets)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def env_secrets(environ: Mapping[str, str]) -> list[str]:
    """The values of the variables in `environ` whose names name a secret (what to pass as
    `secrets=` so that a printed password is masked however it is quoted)."""
    return [v for k, v in environ.items() if is_secret_key(k) and len(v) >= 4]


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(`uri` without its user:password@, username, password); the user and password are None
    when `uri` carries none. An http(s) URI's credentials are what MLflow's client would send."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    password = unquote(parts.password) if parts.password is not None else None
    return clean, unquote(parts.username) if parts.username else None, password
