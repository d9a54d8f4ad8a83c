"""`hint tune STUDY ...`: run (or resume) an ablation study; `hint tune report STUDY`: its
leaderboard and plots."""

from __future__ import annotations

import argparse

from hint_platform.redact import redact_text
from tune_spaces import STUDIES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="run an ablation study with Ray Tune (or `hint tune report STUDY`)",
        description="Run the paper's ablation STUDY with Ray Tune: every trial is a training run "
                    "of the base config with one point of the study's search space, tracked as "
                    "a child of the study's MLflow run. Running it again resumes an interrupted "
                    "study. `hint tune report STUDY` prints the leaderboard and writes the plots. "
                    f"Studies: {', '.join(STUDIES)}.")
    p.add_argument("study", metavar="STUDY", help=f"one of {', '.join(STUDIES)}, or `report`")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the base config, e.g. train.max_steps=200, after "
                        "the options (after `report`: the study's name first)")
    p.add_argument("--config", metavar="BASE",
                   help="base experiment config (default: the study's, e.g. "
                        "configs/paper/hint-3b-sni-def.yaml)")
    p.add_argument("--num-samples", type=int, metavar="N", help="repeats of the search space")
    p.add_argument("--max-concurrent", type=int, metavar="K", help="trials at once")
    p.add_argument("--scheduler", choices=("asha", "fifo"),
                   help="asha stops trials that cannot win; fifo runs every trial to the end")
    p.add_argument("--grace-period", type=int, metavar="STEPS",
                   help="steps every trial runs before ASHA may stop it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hint_platform import tune
    from hint_platform.errors import UserError
    from hint_platform.tune_report import write_report

    reporting = args.study == "report"
    if reporting and not args.overrides:
        raise UserError("hint tune report needs the study's name: hint tune report STUDY")
    name, overrides = (args.overrides[0], args.overrides[1:]) if reporting else (
        args.study, args.overrides)
    study = tune.prepare(name, args.config, overrides, num_samples=args.num_samples,
                         max_concurrent=args.max_concurrent, scheduler=args.scheduler,
                         grace_period=args.grace_period)
    if reporting:
        report_dir = write_report(study, tune.parent_run_id(study))
    else:
        finished = tune.run_study(study)
        report_dir = study.path / "report"
        if not finished:
            return 130
    print((report_dir / "leaderboard.txt").read_text())
    print(f"plots: {report_dir}\nTensorBoard: tensorboard --logdir {study.path}")
    print(f"MLflow: parent run {tune.parent_run_id(study)} at {redact_text(study.tracking_uri)}")
    return 0
