"""Secrets out of everything the platform writes or prints: MLflow params, printed configs, job
entrypoints, error messages, files in the run directory.

What counts as a secret (the forms database and cloud tools print them in):
- the password of a URI (`scheme://user:password@host` -> `scheme://user:***@host`), one that
  holds an `@` included (`postgresql://user:p@ss@host/db`: the host follows the last `@`);
- the value of a name that names a secret: a mapping key, a `KEY=value` (shell assignments,
  `export ...`, `key = value` lines of INI files, `;`-separated connection strings such as ADO's
  `Password=...;`), a URI query parameter (`?token=`, signed URLs' `X-Amz-Signature=`,
  `X-Goog-Signature=`, Azure SAS `sig=`), a quoted `"key": value` (JSON), a YAML line, a
  command-line flag (`--password x`, `--token=x`), an HTTP header (`-H 'X-Api-Key: x'`), or a
  `name: PGPASSWORD` / `value: x` pair (Kubernetes env lists). A name names a secret when one
  of its words is password, secret, token, credentials, signature, ... or ends in one
  (`PGPASSWORD`, `MLFLOW_TRACKING_TOKEN`, `aws_secret_access_key`); not `tokenizer`,
  `max_new_tokens`, nor a name about where a secret lives (`RAY_AUTH_TOKEN_PATH`,
  `--password-file`): the name is split into words, and only whole words count;
- the credentials after `Bearer`, `Basic` or `Token` (an Authorization header), and the
  password of the few commands whose `-p` clearly is one (`sshpass -p`, `docker login -p`,
  `mysql -pSECRET`);
- a PEM private key block;
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

# A word of a name that names a secret; a word that ends in one counts too (PGPASSWORD).
_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "token",
                 "credential", "credentials", "apikey", "authorization", "cookie", "signature"}
_SECRET_SUFFIXES = ("password", "passwd", "secret", "token", "apikey")
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "token"), ("auth", "token"),
                 ("account", "key")}
# Where a secret is, not what it is: RAY_AUTH_TOKEN_PATH, --password-file, token_type.
_NOT_SECRET_LAST_WORDS = {"file", "path", "dir", "name", "type", "env", "id", "url", "uri", "ref"}
# Names that contain such a word and are not secrets: the shell's working directories.
_NOT_SECRETS = {"PWD", "OLDPWD"}
# Word boundaries of a key name: separators, and lower->upper case changes (camelCase).
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")
_NAME = r"[A-Za-z_][\w.-]*"
# A flag's separate value is a secret unless it reads as prose ("Use --password to set it"):
# a short run of lower-case letters.
_PROSE_WORD = re.compile(r"[a-z]{1,7}")
# A value: quoted (escapes allowed), or a run of characters that ends it in URIs, shells,
# connection strings and reprs.
_VALUE = r"""(?P<secret>"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|[^\s&,;'"}\])]+)"""
# The password runs to the last `@` before the host: it may hold `@` and `:`, never `/`.
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):(?P<secret>[^/\s]+)@(?=[^/\s@]*(?:[/\s?#'\"]|$))")
# `KEY=value`, `key = value` opening a line (INI), a quoted `"key": value` (JSON, Python
# reprs), a YAML line `key: value` or a flag `--key value`; a bare `word: value` inside prose is
# left alone ("refused MLFLOW_TRACKING_TOKEN: wrong ...").
_ASSIGNMENT = re.compile(
    rf"""(?P<head>(?P<q>["'])(?P<quoted>{_NAME})(?P=q)\s*[:=]\s*|(?P<bare>{_NAME})=|"""
    rf"""^[ \t]*(?P<ini>{_NAME})[ \t]+=[ \t]*|^[ \t-]*(?P<yaml>{_NAME}):[ \t]+|"""
    rf"""(?<![\w-])--(?P<flag>[A-Za-z][\w-]*)[ \t]+(?![-(]))""" + _VALUE, re.M)
# `name: PGPASSWORD` then `value: ...` (a Kubernetes env entry, YAML or JSON).
_NAME_VALUE = re.compile(
    rf"""(?P<head>\bname["']?\s*:\s*["']?(?P<key>{_NAME})["']?\s*,?\s*-?\s*["']?value["']?\s*:\s*)"""
    + _VALUE)
# An HTTP header given on a command line: -H 'X-Api-Key: value', --header "Cookie: value".
_HEADER = re.compile(rf"""(?P<head>(?:-H|--header)[ =]?(?P<q>["'])(?P<key>[\w-]+):[ \t]*)(?P<secret>[^"'\n]+)(?=(?P=q))""")
_AUTH_HEADER = re.compile(r"(?P<head>\b(?:Bearer|Basic|Token)\s+)(?P<secret>[A-Za-z0-9._~+/=-]{6,})")
# Azure SAS `sig=` (too short a word to count everywhere: only as a URI query parameter).
_QUERY_SIG = re.compile(r"(?P<head>[?&]sig=)(?P<secret>[^&\s#'\"]+)")
# Commands whose -p is a password: sshpass -p X, docker login -p X, mysql -pX (attached).
_PASSWORD_P = re.compile(
    r"(?P<head>\b(?:sshpass|docker\s+login|podman\s+login)\b[^\n|;&]*?\s-p\s+|"
    r"\b(?:mysql|mysqldump|mysqladmin|mariadb)\b[^\n|;&]*?\s-p)(?P<secret>[^\s'\"]+)")
_PEM_KEY = re.compile(r"(?P<head>-----BEGIN [A-Z ]*PRIVATE KEY-----)(?P<secret>.*?)(?=-----END [A-Z ]*PRIVATE KEY-----)", re.S)


def is_secret_key(name: str) -> bool:
    """Whether a key or variable name names a secret: one of its words is password, token, ...
    or ends in one, and it does not name where a secret is kept (a file, a path)."""
    if str(name) in _NOT_SECRETS:
        return False
    words = [w.lower() for w in _WORD_SPLIT.split(str(name)) if w]
    if not words or (len(words) > 1 and words[-1] in _NOT_SECRET_LAST_WORDS):
        return False
    return (any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words)
            or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))
            or words[-2:] == ["access", "key"])  # SharedAccessKey; not aws_access_key_id


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret it shows replaced by ***."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _PEM_KEY.sub(lambda m: m["head"] + MASK, text)
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _AUTH_HEADER.sub(lambda m: m["head"] + MASK, text)
    text = _QUERY_SIG.sub(lambda m: m["head"] + MASK, text)
    text = _PASSWORD_P.sub(lambda m: m["head"] + MASK, text)
    text = _HEADER.sub(lambda m: _masked(m, m["key"]), text)
    text = _NAME_VALUE.sub(lambda m: _masked(m, m["key"]), text)
    return _ASSIGNMENT.sub(lambda m: _masked(m, m["quoted"] or m["bare"] or m["ini"] or m["yaml"]
                                             or m["flag"]), text)


def _masked(m: re.Match, key: str) -> str:
    # "Authorization: Bearer ***": the scheme stays, the header rule masked what follows it.
    value = m["secret"].strip("\"'")
    if (not is_secret_key(key) or value in ("", MASK, "Bearer", "Basic", "Token")
            or value.startswith(MASK) or (m.re is _ASSIGNMENT and m["flag"] and _PROSE_WORD.fullmatch(value))):
        return m.group(0)
    quote = m["secret"][0] if m["secret"][0] in "\"'" else ""
    return f"{m['head']}{quote}{MASK}{quote}"


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of `value` (mappings, lists, tuples, strings, nested) with secrets masked: the
    value of a key named like a secret becomes *** whatever it is (None and empty stay), as
    does the `value` of a {name: PGPASSWORD, value: ...} entry."""
    secrets = tuple(secrets)
    if isinstance(value, Mapping):
        named_secret = isinstance(value.get("name"), str) and is_secret_key(value["name"])
        return {k: MASK if (is_secret_key(k) or (named_secret and k == "value"))
                and v not in (None, "") else redact(v, secrets)
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
