"""The `hint` command. Each command group lives in its own module under hint_platform/commands/
and adds its subcommands through `register(subparsers)`; this file only assembles them."""

from __future__ import annotations

import argparse
import importlib
import sys

# One module per command group, in the order `hint --help` lists them.
COMMAND_MODULES = ("demo", "train", "eval", "data", "registry", "flops", "tune", "submit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hint",
        description="Train, evaluate, track and serve HINT hypernetworks on Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"hint_platform.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line message, not a traceback, for known errors
        from hint_platform.errors import UserError

        if isinstance(e, UserError):
            print(f"hint {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
