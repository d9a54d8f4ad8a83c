"""Creates the users of a team MLflow server (`mlflow server --app-name basic-auth`), idempotently.

A writer (the `hint` account that training runs and registrations use) may create and edit every
experiment and registered model; a reader may read them and nothing more. Each password is read
from a file (a compose or Kubernetes secret), never from the command line. Run again at any time:
an existing user gets the password its file holds now (rotation) and the same grants.

    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD_FILE=/run/secrets/mlflow_admin_password \
    python bootstrap_users.py http://127.0.0.1:5000 \
        --writer hint=/run/secrets/mlflow_hint_password --reader viewer=/run/secrets/mlflow_viewer_password

The admin's own credentials come from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or a
file named by MLFLOW_TRACKING_PASSWORD_FILE), as every MLflow client reads them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException, RestException
from mlflow.server.auth.client import AuthServiceClient

# Resource types a grant covers, "*" = every resource of the type (the created ones included).
RESOURCE_TYPES = ("experiment", "registered_model")
WRITE, READ = "EDIT", "READ"


def user_and_password_file(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=PASSWORD_FILE")
    return name, Path(path)


def read_password(path: Path) -> str:
    try:
        password = path.read_text().strip()
    except OSError as e:
        sys.exit(f"cannot read a password file {path}: {e.strerror}")
    if len(password) < 12:  # MLflow's own minimum; say so before the server does
        sys.exit(f"the password in {path} is shorter than 12 characters (MLflow refuses it)")
    return password


def ensure_user(client: AuthServiceClient, name: str, password: str, permission: str) -> str:
    """Creates `name` (or sets its password) and grants `permission` on every resource type."""
    try:
        client.get_user(name)
        client.update_user_password(name, password)
        action = "updated"
    except RestException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(name, password)
        action = "created"
    for resource_type in RESOURCE_TYPES:
        try:
            client.grant_user_permission(name, resource_type, "*", permission)
        except RestException as e:  # granted before, maybe another level: replace it
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            client.revoke_user_permission(name, resource_type, "*")
            client.grant_user_permission(name, resource_type, "*", permission)
    return action


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tracking_uri", help="the server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--writer", action="append", default=[], type=user_and_password_file,
                        metavar="NAME=PASSWORD_FILE", help="a user who trains and registers (repeatable)")
    parser.add_argument("--reader", action="append", default=[], type=user_and_password_file,
                        metavar="NAME=PASSWORD_FILE", help="a read-only user (repeatable)")
    args = parser.parse_args(argv)
    password_file = os.environ.pop("MLFLOW_TRACKING_PASSWORD_FILE", None)
    if password_file:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = read_password(Path(password_file))
    if not (os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
        sys.exit("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                 "MLFLOW_TRACKING_PASSWORD_FILE) to the server's admin")
    client = AuthServiceClient(args.tracking_uri)
    try:
        for users, permission in ((args.writer, WRITE), (args.reader, READ)):
            for name, path in users:
                action = ensure_user(client, name, read_password(path), permission)
                print(f"{action} {name}: {permission} on every {' and '.join(RESOURCE_TYPES)}")
    except MlflowException as e:
        sys.exit(f"{args.tracking_uri}: {e.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
