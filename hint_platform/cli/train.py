"""`hint train CONFIG [key=value ...]`: one training stage on Ray, then the export registered."""

from __future__ import annotations

import argparse

import yaml

from hint_platform import config
from hint_platform.redact import redact


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="pretrain or fine-tune from an experiment config on Ray",
        description="Run one training stage (Ray Train + FSDP) from an experiment config. A run "
                    "with the same name and storage path resumes from its latest checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", help="experiment config: a YAML path, or a shipped config's name (paper/hint-3b-sni-def)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.max_steps=20 model.variant=concat")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print it resolved; start nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False), end="")
        return 0
    result = train_and_register(cfg)
    for key, value in redact(result).items():
        print(f"{key}: {value}")
    return 0


def train_and_register(cfg: config.ExperimentConfig) -> dict:
    """fit(cfg); then, when cfg.run.register_as names a model, its export logged and registered."""
    from hint_platform.tracking import registry
    from hint_platform.training.driver import fit

    result = fit(cfg)
    summary = {"run_dir": result.run_dir, "export_dir": result.export_dir, "steps": result.steps_done,
               "mlflow_run_id": result.mlflow_run_id,
               **{k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}}
    if cfg.run.register_as and result.export_dir:
        logged = registry.log_and_register(result.export_dir, tracking_uri=result.tracking_uri,
                                           run_id=result.mlflow_run_id, name=cfg.run.register_as)
        summary["registered"] = logged["model_uri"]
    return summary
