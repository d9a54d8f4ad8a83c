"""`hint configs [NAME]`: the experiment configs the platform ships, and one of them printed (to
start your own: `hint configs demo/finetune > my.yaml`)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "configs", help="list the shipped experiment configs, or print one",
        description="Without NAME: the names of the configs the platform ships (usable wherever a "
                    "config path is). With NAME: that config's YAML, to copy and edit.")
    p.add_argument("name", nargs="?", help="a shipped config, e.g. paper/hint-3b-sni-def")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hint_platform import config

    if args.name:
        print(config.find(args.name).read_text(), end="")
        return 0
    for name in config.shipped_configs():
        print(name)
    return 0
