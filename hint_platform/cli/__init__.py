"""The `hint` command. Each command group lives in its own module of this package and adds its
subcommands through `register(subparsers)`; this file only assembles them. Command modules import
the platform inside their functions: `hint --help` should not pay for torch, Ray and MLflow."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# One module per command group, in the order `hint --help` lists them.
COMMAND_MODULES = ("demo", "train", "eval", "predict", "serve", "adapter", "data", "registry", "flops", "tune",
                   "submit", "configs", "paper")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hint",
        description="Train, evaluate, track and serve HINT hypernetworks on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"hint_platform.cli.{name}").register(subparsers)
    return parser


def _redacted_traceback(kind, error, tb) -> None:
    """sys.excepthook: an unexpected error's traceback, secrets masked (MLflow's and requests'
    errors name the URL they failed on, a password in it included)."""
    import traceback

    from hint_platform.redact import env_secrets, redact_text

    text = "".join(traceback.format_exception(kind, error, tb))
    sys.stderr.write(redact_text(text, env_secrets(os.environ)))


def _config_among_overrides(args: argparse.Namespace) -> None:
    """`hint train key=value CONFIG`: argparse gave the first positional to the config; the
    config is the one without `=` (an override always has one, a config name never does)."""
    config = getattr(args, "config", None)
    if not (isinstance(config, str) and hasattr(args, "overrides")) or "=" not in config \
            or os.path.exists(config):
        return
    positional = [config, *args.overrides]
    named = [a for a in positional if "=" not in a]
    if len(named) == 1:
        args.config = named[0]
        args.overrides = [a for a in positional if a != named[0]]


def main(argv: list[str] | None = None) -> int:
    sys.excepthook = _redacted_traceback
    parser = build_parser()
    # Options, `key=value` overrides and the config mix in any order: argparse leaves what
    # follows an option unparsed; it joins the command's own.
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
        _config_among_overrides(args)
    stray = [a for a in extra if a.startswith("-") or ("=" not in a and a != getattr(args, "config", None))]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line message, not a traceback, for known errors
        from hint_platform.errors import USER_ERRORS
        from hint_platform.redact import env_secrets, redact_text

        if isinstance(e, USER_ERRORS):  # shown without a secret of this process's environment
            print(f"hint {args.command}: error: {redact_text(str(e), env_secrets(os.environ))}",
                  file=sys.stderr)
            return 2
        raise
