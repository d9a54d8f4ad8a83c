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
                   help="validate the config (everything but data an earlier stage will write) "
                        "and print it resolved, with the model's parameters and memory per GPU "
                        "(built on the meta device); start nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hint_platform.training.preflight import check

    checked = check(config.load(args.config, args.overrides))
    if args.dry_run:
        print(yaml.safe_dump(redact(checked.cfg.to_dict()), sort_keys=False), end="")
        print("\n".join(f"# {line}" for line in size_lines(checked.cfg)))
        for path in checked.missing:
            print(f"# note: not there yet (an earlier stage writes it?): {redact(path)}")
    for note in checked.notes:
        print(f"# note: {redact(note)}")
    if args.dry_run:
        return 0
    result = train_and_register(checked.cfg)
    for key, value in redact(result).items():
        print(f"{key}: {value}")
    return 0


OPTIMIZER_NAMES = {"adafactor": "Adafactor", "adamw": "AdamW"}


def size_lines(cfg: config.ExperimentConfig) -> list[str]:
    """The model at its real size on the meta device: parameters, the memory per GPU of this
    config's training (hint_model.memory), and the task state of Appendix C.2."""
    from hint_model.flops import task_cost
    from hint_model.memory import meta_model, parameter_counts, training_memory

    m = config.model_config(cfg)
    model = meta_model(m)
    n = parameter_counts(m, model)
    d, t = cfg.data, cfg.train
    mem = training_memory(m, workers=t.num_workers, micro_batch=t.micro_batch_size,
                          hyper_len=d.max_hyper_len, input_len=d.max_input_len,
                          target_len=d.max_target_len, checkpointing=t.activation_checkpointing,
                          compute_bytes=2 if t.use_gpu else 4, model=model, optimizer=t.optimizer)
    state = task_cost(m, n=1, t=d.max_hyper_len, i=d.max_input_len, o=d.max_target_len)
    gib = 2 ** 30
    return [
        f"model {m.variant} ({cfg.model.preset} shapes): {n.total / 1e9:.3f}B parameters, "
        f"{n.trainable / 1e9:.3f}B trained; {m.model_type} {n.underlying / 1e9:.3f}B, hyper-encoder "
        f"{n.hyper_encoder / 1e9:.3f}B, generator {n.generator / 1e9:.3f}B",
        f"memory per GPU ({t.num_workers} workers, FSDP, {OPTIMIZER_NAMES[t.optimizer]}, micro-batch "
        f"{t.micro_batch_size}, lengths {d.max_hyper_len}/{d.max_input_len}/{d.max_target_len}, "
        f"activation checkpointing {'on' if t.activation_checkpointing else 'off'}): "
        f"{mem.total / gib:.1f} GiB = weights {mem.weights / gib:.1f} + gradients "
        f"{mem.gradients / gib:.1f} + optimizer {mem.optimizer / gib:.2f} + gathered "
        f"{mem.gathered / gib:.1f} + activations {mem.activations / gib:.1f} (an estimate)",
        f"task state (Appendix C.2, bf16): {state.hint_state_bytes / 2 ** 20:.1f} MiB; a "
        f"decoder-only KV cache of the instruction {state.kv_cache_bytes / 2 ** 20:.1f} MiB",
    ]


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
