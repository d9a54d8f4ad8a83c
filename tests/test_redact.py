"""Redaction (hint_platform/redact.py): what is a secret, and that nothing else changes."""

import pytest

from hint_platform.redact import MASK, env_secrets, is_secret_key, redact, redact_text, split_credentials


@pytest.mark.parametrize("name", [
    "password", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "api_key",
    "apiKey", "OPENAI_API_KEY", "aws_secret_access_key", "client-secret", "run.db_password",
    "credentials", "GOOGLE_APPLICATION_CREDENTIALS", "Authorization", "private_key", "accessToken",
])
def test_names_of_secrets(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", [
    "tokenizer", "data.tokenizer", "max_new_tokens", "MLFLOW_TRACKING_USERNAME", "tracking_uri",
    "aws_access_key_id", "author", "keyword", "passes", "num_workers", "secretary",
    "PWD", "OLDPWD",  # the shell's working directory: masking it hid every path in messages
])
def test_names_that_are_not_secrets(name):
    assert not is_secret_key(name)


@pytest.mark.parametrize("text, expected", [
    ("http://hint:s3cr3t-pw@mlflow:5000/x", f"http://hint:{MASK}@mlflow:5000/x"),
    ("see postgresql://mlflow:p%40ss@db:5432/mlflow and https://u:v@h",
     f"see postgresql://mlflow:{MASK}@db:5432/mlflow and https://u:{MASK}@h"),
    ("https://host/api?token=abc123&page=2", f"https://host/api?token={MASK}&page=2"),
    ("MLFLOW_TRACKING_PASSWORD=hunter2hunter2 MLFLOW_TRACKING_USERNAME=hint",
     f"MLFLOW_TRACKING_PASSWORD={MASK} MLFLOW_TRACKING_USERNAME=hint"),
    ("""{'password': 'x y z', "api_key": "k-123", 'user': 'hint'}""",
     f"""{{'password': '{MASK}', "api_key": "{MASK}", 'user': 'hint'}}"""),
    ("Authorization: Bearer abcdef123456", f"Authorization: Bearer {MASK}"),
    ("secret: shh-its-me\nname: run", f"secret: {MASK}\nname: run"),
])
def test_secrets_in_text_are_masked(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize("text", [
    "http://127.0.0.1:5000", "ssh://git@github.com/x", "data.tokenizer=runs/tok max_new_tokens=64",
    "s3://bucket/runs/hint-3b", "sqlite:////tmp/runs/mlflow.db", "time 12:30:01 step=3 loss=0.5",
    "password=***", "the server refused MLFLOW_TRACKING_TOKEN: wrong or expired",
])
def test_text_without_secrets_is_unchanged(text):
    assert redact_text(text) == text


def test_named_secret_values_are_masked_wherever_they_appear():
    env = {"MLFLOW_TRACKING_PASSWORD": "pw-0123456789", "HOME": "/home/x", "RAY_AUTH_TOKEN": "abc",
           "PWD": "/home/x/work"}
    assert env_secrets(env) == ["pw-0123456789"]  # 3 characters are too short to mask everywhere
    text = "login failed for hint with pw-0123456789 (quoted: 'pw-0123456789')"
    assert redact_text(text, env_secrets(env)) == f"login failed for hint with {MASK} (quoted: '{MASK}')"


def test_nested_structures_keep_their_shape():
    config = {
        "name": "run",
        "run": {"tracking_uri": "http://hint:pw1234567890@h:5000", "password": 12345, "token": None},
        "data": {"tokenizer": "runs/tok", "train": [{"path": "s3://b/x", "api_key": "k"}]},
        "env": ("A=1", "SECRET_KEY=abc"),
    }
    assert redact(config) == {
        "name": "run",
        "run": {"tracking_uri": f"http://hint:{MASK}@h:5000", "password": MASK, "token": None},
        "data": {"tokenizer": "runs/tok", "train": [{"path": "s3://b/x", "api_key": MASK}]},
        "env": ("A=1", f"SECRET_KEY={MASK}"),
    }
    assert config["run"]["password"] == 12345  # a copy: the input is untouched


def test_credentials_split_off_a_uri():
    assert split_credentials("http://hint:p%40ss@h:5000/path?x=1") == ("http://h:5000/path?x=1", "hint", "p@ss")
    assert split_credentials("https://h:5000") == ("https://h:5000", None, None)
    assert split_credentials("sqlite:///runs/mlflow.db") == ("sqlite:///runs/mlflow.db", None, None)
