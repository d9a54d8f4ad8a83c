"""`hint submit` (an experiment as a Ray job) and `hint jobs` (list, status, logs, stop)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from hint_platform.errors import UserError
from hint_platform.redact import env_secrets, redact


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run an experiment on a Ray cluster (Ray Jobs)",
        description="Submit `hint train CONFIG key=value ...` to a Ray cluster. The working "
        "directory (code and configs; not virtualenvs, run outputs or data) travels with the job.",
    )
    p.add_argument("config", help="experiment config (YAML) inside the working directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    _address_option(p)
    p.add_argument("--name", help="run name (overrides the config's `name`; same name = resume)")
    p.add_argument("--wait", action="store_true",
                   help="stream the job's logs and exit with its status (0 only if SUCCEEDED)")
    p.add_argument("--working-dir", default=".",
                   help="directory uploaded as the job's working directory (default: .)")
    p.add_argument("--shared-dir", default=None,
                   help="storage every node reaches (e.g. /mnt/shared or s3://bucket/hint): the "
                   "config's relative paths (runs, data, checkpoints) are put under it")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI the job logs to, as the cluster reaches it "
                   "(default: $MLFLOW_TRACKING_URI here, if set; no password in it). The job "
                   "logs in as the cluster's nodes do: MLFLOW_TRACKING_USERNAME/_PASSWORD (or "
                   "_TOKEN) from the cluster's secret store (infra/kuberay), never from here")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable; no secrets: the Jobs "
                   "API shows them to everyone)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the job (secrets masked); submit nothing")
    p.set_defaults(func=run_submit)

    jobs = subparsers.add_parser("jobs", help="run, list, inspect, follow and stop jobs on a Ray cluster")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run", help="run another hint command on the cluster (e.g. hint predict)",
        description="Run `hint COMMAND ...` on the cluster as a Ray job, e.g. `hint jobs run "
                    "--address http://HEAD:8265 -- predict models:/hint@champion "
                    "/mnt/shared/tasks.jsonl --output /mnt/shared/predictions`. Its paths must be "
                    "on storage every node reaches. `hint submit` is the way for `hint train`.")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                     help="the hint command and its arguments, after --")
    _address_option(run)
    run.add_argument("--wait", action="store_true",
                     help="stream the job's logs and exit with its status (0 only if SUCCEEDED)")
    run.add_argument("--working-dir", default=".",
                     help="directory uploaded as the job's working directory (default: .)")
    run.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI the job logs to (default: $MLFLOW_TRACKING_URI)")
    run.add_argument("--dry-run", action="store_true", help="print the job; submit nothing")
    run.set_defaults(func=run_command)
    for action, helptext, func in (
        ("list", "jobs on the cluster, newest last", run_list),
        ("status", "a job's status and message", run_status),
        ("logs", "a job's logs", run_logs),
        ("stop", "stop a running job", run_stop),
    ):
        a = actions.add_parser(action, help=helptext)
        if action != "list":
            a.add_argument("job_id", metavar="ID", help="submission id (as `hint jobs list` shows)")
        if action == "logs":
            a.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        _address_option(a)
        a.set_defaults(func=func)


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")


def run_submit(args) -> int:
    from hint_platform.jobs import submit as submit_lib

    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    request = submit_lib.build_request(
        args.config, args.overrides, working_dir=args.working_dir, name=args.name,
        tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), env_vars=env_vars,
        shared_dir=args.shared_dir,
    )
    return _submit(request, args)


def run_command(args) -> int:
    from hint_platform.jobs import submit as submit_lib

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise UserError("hint jobs run needs a command: hint jobs run --address A -- predict ...")
    if command[0] in ("submit", "jobs", "train"):
        raise UserError(f"hint jobs run {command[0]}: use `hint submit CONFIG` for training, and "
                        "`hint jobs` here, on this machine")
    request = submit_lib.command_request(
        command, working_dir=args.working_dir, run_name=command[0],
        tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    return _submit(request, args)


def _submit(request, args) -> int:
    """Prints the job (--dry-run), or submits it and, with --wait, follows it."""
    from hint_platform.jobs import submit as submit_lib

    if args.dry_run:
        job = {"submission_id": request.submission_id, "entrypoint": request.entrypoint,
               "runtime_env": request.runtime_env, "metadata": request.metadata}
        print(json.dumps(_shown(job), indent=2))
        return 0
    client = submit_lib.connect(args.address)
    job_id = submit_lib.submit(client, request)
    print(f"submitted {job_id}: {_shown(request.entrypoint)}")
    if not args.wait:
        print(f"follow it with: hint jobs logs --follow {job_id} --address {client.get_address()}")
        return 0
    return _follow_and_report(client, job_id)


def _shown(value):
    """What may be printed of a job: secrets masked, this process's secret values included."""
    return redact(value, env_secrets(os.environ))


class _Redacting:
    """A text stream that masks secrets in what is written to it (a job's logs)."""

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(_shown(text))

    def flush(self) -> None:
        self.out.flush()


def _follow_and_report(client, job_id: str) -> int:
    from hint_platform.jobs import submit as submit_lib

    try:
        status = submit_lib.follow(client, job_id, out=_Redacting(sys.stdout))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (hint jobs stop {job_id})", file=sys.stderr)
        return 130
    info = submit_lib.job_info(client, job_id)
    print(f"job {job_id} {status}" + (f": {_shown(info.message)}" if info.message else ""))
    return 0 if status == "SUCCEEDED" else 1


def run_list(args) -> int:
    from hint_platform.jobs import submit as submit_lib

    client = submit_lib.connect(args.address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'ID':<36} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for job in jobs:
        started = (datetime.datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
                   if job.start_time else "-")
        print(f"{job.submission_id or job.job_id:<36} {str(job.status):<10} {started:<19} "
              f"{_shown(job.entrypoint)}")
    return 0


def run_status(args) -> int:
    from hint_platform.jobs import submit as submit_lib

    info = submit_lib.job_info(submit_lib.connect(args.address), args.job_id)
    print(f"{args.job_id} {info.status}" + (f": {_shown(info.message)}" if info.message else ""))
    return 0


def run_logs(args) -> int:
    from hint_platform.jobs import submit as submit_lib

    client = submit_lib.connect(args.address)
    submit_lib.job_info(client, args.job_id)  # a clear error for an unknown id
    if args.follow:
        return _follow_and_report(client, args.job_id)
    sys.stdout.write(_shown(client.get_job_logs(args.job_id)))
    return 0


def run_stop(args) -> int:
    from hint_platform.jobs import submit as submit_lib

    client = submit_lib.connect(args.address)
    submit_lib.job_info(client, args.job_id)
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: " + ("stop requested" if stopped else "not running, nothing to stop"))
    return 0
