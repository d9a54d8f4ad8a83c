"""`hint tune STUDY ...`: run (or resume) an ablation study; `hint tune report STUDY`: its
leaderboard and plots. Each study is a subcommand, and so is `report`."""

from __future__ import annotations

import argparse

from hint_platform.redact import redact_text
from tune_spaces import STUDIES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="run an ablation study with Ray Tune, or report on one",
        description="Run the paper's ablation STUDY with Ray Tune: every trial is a training run "
                    "of the base config with one point of the study's search space, tracked as "
                    "a child of the study's MLflow run. Running it again resumes an interrupted "
                    "study. `hint tune report STUDY` prints the leaderboard and writes the plots.")
    studies = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name in STUDIES:
        run_parser = studies.add_parser(name, help=f"run the {name} study")
        _common(run_parser)
        run_parser.add_argument("--num-samples", type=int, metavar="N",
                                help="repeats of the search space")
        run_parser.add_argument("--max-concurrent", type=int, metavar="K", help="trials at once")
        run_parser.add_argument("--scheduler", choices=("asha", "fifo"),
                                help="asha stops trials that cannot win; fifo runs every trial to the end")
        run_parser.add_argument("--grace-period", type=int, metavar="STEPS",
                                help="steps every trial runs before ASHA may stop it")
        run_parser.set_defaults(func=run)
    report = studies.add_parser("report", help="leaderboard and plots of a study (run or partial)")
    report.add_argument("name", metavar="STUDY", choices=STUDIES, help=", ".join(STUDIES))
    _common(report)
    report.set_defaults(func=run_report)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the base config, e.g. train.max_steps=200")
    p.add_argument("--config", metavar="BASE",
                   help="base experiment config (default: the study's, paper/hint-3b-sni-def)")


def run(args: argparse.Namespace) -> int:
    from hint_platform.tuning.plan import load_study_run
    from hint_platform.tuning.runner import run_study

    study = load_study_run(args.study, args.config, args.overrides, num_samples=args.num_samples,
                           max_concurrent=args.max_concurrent, scheduler=args.scheduler,
                           grace_period=args.grace_period)
    if not run_study(study):
        return 130
    _print_report(study, study.path / "report")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from hint_platform.tuning.plan import load_study_run
    from hint_platform.tuning.report import require_results, write_report
    from hint_platform.tuning.study_runs import parent_run_id

    study = load_study_run(args.name, args.config, args.overrides, check_data=False)
    require_results(study)
    _print_report(study, write_report(study, parent_run_id(study)))
    return 0


def _print_report(study, report_dir) -> None:
    from hint_platform.tuning.study_runs import parent_run_id

    print((report_dir / "leaderboard.txt").read_text())
    print(f"plots: {report_dir}\nTensorBoard: tensorboard --logdir {study.path}")
    print(f"MLflow: parent run {parent_run_id(study)} at {redact_text(study.tracking_uri)}")
