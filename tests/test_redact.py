"""Redaction (hint_platform/redact.py): what is a secret, and that nothing else changes."""

import pytest

from hint_platform.redact import MASK, env_secrets, is_secret_key, redact, redact_text, split_credentials


@pytest.mark.parametrize("name", [
    "password", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "api_key",
    "apiKey", "OPENAI_API_KEY", "aws_secret_access_key", "client-secret", "run.db_password",
    "credentials", "Authorization", "private_key", "accessToken",
    "PGPASSWORD", "MYSQL_PWD", "AWS_SESSION_TOKEN", "X-Amz-Signature", "X-Goog-Signature",
    "AccountKey", "SharedAccessKey", "SharedAccessSignature", "GITHUB_TOKEN", "DBPASSWORD",
])
def test_names_of_secrets(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", [
    "tokenizer", "data.tokenizer", "max_new_tokens", "MLFLOW_TRACKING_USERNAME", "tracking_uri",
    "aws_access_key_id", "author", "keyword", "passes", "num_workers", "secretary",
    "PWD", "OLDPWD",  # the shell's working directory: masking it hid every path in messages
    # Where a secret is kept, not the secret: masking these hid paths and names in messages.
    "RAY_AUTH_TOKEN_PATH", "password-file", "GOOGLE_APPLICATION_CREDENTIALS_FILE", "token_type",
    "secretName", "X-Amz-Credential-Id",
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


# The forms database and cloud tools print secrets in; each holds the secret `S3cr3t-v4lue`.
FORMS = [
    # environment assignments (our own infra: libpq's PGPASSWORD), shells' and `env`'s output
    "PGPASSWORD=S3cr3t-v4lue psql -h db -U mlflow",
    "export AWS_SECRET_ACCESS_KEY=S3cr3t-v4lue",
    "+ export 'AWS_SESSION_TOKEN=S3cr3t-v4lue'",
    "export PGPASSWORD=\"S3cr3t-v4lue\"",
    "aws_secret_access_key = S3cr3t-v4lue",  # ~/.aws/credentials
    # signed URLs: S3, GCS, Azure SAS
    "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=S3cr3t-v4lue&X-Amz-Expires=3600",
    "https://storage.googleapis.com/b/o?X-Goog-Date=20260101T000000Z&X-Goog-Signature=S3cr3t-v4lue",
    "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&se=2026-01-01&sig=S3cr3t-v4lue%3D",
    # connection strings: a password holding @ and :, ADO style, Azure storage, JDBC
    "postgresql://mlflow:S3cr3t-v4lue@db:5432/mlflow",
    "postgresql://user:p@ss:S3cr3t-v4lue@db.internal/mlflow",
    "mongodb+srv://admin:S3cr3t-v4lue@cluster0.example.net/?retryWrites=true",
    "Server=tcp:db,1433;User Id=sa;Password=S3cr3t-v4lue;Encrypt=True;",
    "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=S3cr3t-v4lue==;EndpointSuffix=core.windows.net",
    "jdbc:postgresql://db/mlflow?user=mlflow&password=S3cr3t-v4lue",
    # command-line flags
    "mlflow server --password S3cr3t-v4lue --port 5000",
    "tool --password=S3cr3t-v4lue",
    "gh auth login --with-token --token S3cr3t-v4lue",
    "hf upload --token=S3cr3t-v4lue repo .",
    "sshpass -p S3cr3t-v4lue ssh host",
    "docker login -u me -p S3cr3t-v4lue registry.example.com",
    "mysql -u root -pS3cr3t-v4lue mlflow",
    # HTTP
    "Authorization: Bearer S3cr3t-v4lue",
    "curl -H 'X-Api-Key: S3cr3t-v4lue' https://api.example.com",
    "Authorization: Token S3cr3t-v4lue",
    # JSON, YAML, Kubernetes env entries
    '{"password": "S3cr3t-v4lue", "user": "hint"}',
    '{"client_secret":"S3cr3t-v4lue"}',
    '{"password": "a \\"quoted\\" S3cr3t-v4lue"}',
    "- name: PGPASSWORD\n  value: S3cr3t-v4lue",
    '{"name": "MLFLOW_TRACKING_PASSWORD", "value": "S3cr3t-v4lue"}',
    "-----BEGIN RSA PRIVATE KEY-----\nMIIS3cr3t-v4lue\n-----END RSA PRIVATE KEY-----",
]


@pytest.mark.parametrize("text", FORMS)
def test_the_forms_tools_print_secrets_in(text):
    out = redact_text(text)
    assert "S3cr3t" not in out and "v4lue" not in out and MASK in out, out


@pytest.mark.parametrize("text, expected", [
    ("export AWS_SECRET_ACCESS_KEY=S3cr3t-v4lue", f"export AWS_SECRET_ACCESS_KEY={MASK}"),
    ("postgresql://user:p@ss:S3cr3t-v4lue@db.internal/mlflow", f"postgresql://user:{MASK}@db.internal/mlflow"),
    ("Server=tcp:db,1433;User Id=sa;Password=S3cr3t-v4lue;Encrypt=True;",
     f"Server=tcp:db,1433;User Id=sa;Password={MASK};Encrypt=True;"),
    ("mlflow server --password S3cr3t-v4lue --port 5000", f"mlflow server --password {MASK} --port 5000"),
    ("https://b/k?X-Amz-Signature=S3cr3t-v4lue&X-Amz-Expires=3600", f"https://b/k?X-Amz-Signature={MASK}&X-Amz-Expires=3600"),
    ("https://a/c?sv=2022-11-02&sig=S3cr3t-v4lue&sp=r", f"https://a/c?sv=2022-11-02&sig={MASK}&sp=r"),
    ("mysql -u root -pS3cr3t-v4lue mlflow", f"mysql -u root -p{MASK} mlflow"),
    ("curl -H 'X-Api-Key: S3cr3t-v4lue' https://api", f"curl -H 'X-Api-Key: {MASK}' https://api"),
    ("- name: PGPASSWORD\n  value: S3cr3t-v4lue", f"- name: PGPASSWORD\n  value: {MASK}"),
])
def test_forms_keep_what_is_not_secret(text, expected):
    assert redact_text(text) == expected


ORDINARY = [
    "The password must be at least 12 characters; ask the admin for a token.",
    "Tokenization took 3.2 s for 1,024 tokens (max_new_tokens=64, sig figs: 3).",
    "saved /home/hint/runs/secrets-demo/export/model.safetensors",
    "see https://mlflow.example.com/#/experiments/3?searchFilter=tags.x%3D1&sig_level=2",
    "s3://bucket/path/to/file.json gs://b/x?generation=17 postgresql://mlflow@db:5432/mlflow",
    "git clone git@github.com:allenai/hyper-task-descriptions.git",
    "hint serve --num-beams 4 --max-new-tokens 32 --port 8000 -p 8000",
    "psql -h db -p 5432 -U mlflow",
    "RAY_AUTH_TOKEN_PATH=/run/secrets/ray-token --password-file /run/secrets/pw",
    "Use --password to set it (or --token).",
    "email me at someone@example.com, at 10:30:00 on https://example.com/a@b",
    "- name: PGHOST\n  value: db.internal",
    "secretKeyRef: {name: hint-mlflow, key: postgres-password}",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_unchanged(text):
    assert redact_text(text) == text


def test_a_kubernetes_env_entry_is_masked_as_a_mapping():
    env = [{"name": "PGPASSWORD", "value": "x-123"}, {"name": "PGHOST", "value": "db"}]
    assert redact(env) == [{"name": "PGPASSWORD", "value": MASK}, {"name": "PGHOST", "value": "db"}]


def test_mlflow_is_called_only_through_the_login_helpers():
    """MLflow prints and raises with the tracking URI it was given: every client and every
    tracking URI goes through hint_platform/tracking/runs.py (mlflow_client,
    tracking_uri_scope), which hands MLflow the URI without its password."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "hint_platform"
    direct = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py") if p.name != "runs.py"
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if "MlflowClient(" in line or "set_tracking_uri(" in line]
    assert not direct, direct
