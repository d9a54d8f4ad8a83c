"""`hint adapter MODEL (--instruction TEXT | --task FILE [--format def|def_pos]) --output DIR`:
one task of a decoder-only `lora_only` model as a PEFT LoRA adapter directory (PEFT, vLLM,
SGLang load it)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "adapter", help="a task's generated LoRA as a PEFT adapter directory (PEFT, vLLM, SGLang)",
        description="Generate the LoRA of one task with MODEL (a decoder-only lora_only model) and "
                    "write it to --output as PEFT writes an adapter (adapter_config.json, "
                    "adapter_model.safetensors) with hint_provenance.json (the instruction's "
                    "SHA-256, where the model comes from, the base). A model from MLflow also gets "
                    "the tag hint.adapter.<first 12 hex of the SHA-256> = the output directory on "
                    "the run that logged it. Written beside --output and renamed when complete; an "
                    "existing --output that is not empty is refused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export directory, or models:/NAME@ALIAS (models:/NAME/VERSION)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--instruction", help="the task's instruction (its definition)")
    source.add_argument("--task", metavar="FILE",
                        help="a Super-Natural Instructions task JSON, given to the hypernetwork in "
                             "--format as in training and evaluation")
    p.add_argument("--format", choices=("def", "def_pos"), default="def",
                   help="with --task: 'def' its Definition; 'def_pos' the Definition and its first "
                        "--positives positive examples (the paper's Def + 2 Pos.), which must fit "
                        "the model's max_hyper_len")
    p.add_argument("--positives", type=int, default=2,
                   help="with --format def_pos: how many of the task's positive examples")
    p.add_argument("--output", required=True, help="the adapter directory to write (new or empty)")
    p.add_argument("--name", help="the task's name, recorded in the provenance (default: the task "
                                  "file's name, else 'task')")
    p.add_argument("--base", help="the base model, as adapter_config.json's base_model_name_or_path: "
                                  "a Hugging Face directory (checked to fit the adapter) or a hub "
                                  "name (default: the Hugging Face checkpoint the model was built "
                                  "from, as its export records it: a hub name, else its path)")
    p.add_argument("--base-revision", help="the base's revision (default: a Hugging Face cache "
                                           "snapshot's commit when --base, or the recorded base, "
                                           "is one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the model's dtype while it generates the adapter")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: "
                                          "$MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hint_platform import export
    from hint_platform.config import ExperimentConfig
    from hint_platform.errors import UserError
    from hint_platform.serving import adapter
    from hint_platform.serving.predictor import CachedPredictor
    from hint_platform.tracking import registry
    from hint_platform.tracking.runs import check_reachable, resolve_tracking_uri

    if args.task is None and args.format != "def":
        raise UserError(f"--format {args.format}: formats a --task file; --instruction is used as given")
    if args.positives < 0:
        raise UserError(f"--positives {args.positives}: must be 0 or more")
    output = Path(os.path.abspath(args.output))
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {args.output}: exists and is not an empty directory")
    instruction, name = _instruction(args)
    uri = None
    if args.model.startswith("models:/") or "://" in args.model:
        uri = args.tracking_uri or resolve_tracking_uri(ExperimentConfig())
        check_reachable(uri)
    model_dir = registry.resolve_export(args.model, uri)
    adapter.check(export.model_config(model_dir))  # before any weight is read
    base, revision = _base(args, export.model_config(model_dir))
    source = registry.model_source(args.model, uri)
    predictor = CachedPredictor(model_dir, cache_mib=0, dtype=args.dtype)
    described = {"task": name} if args.task is None else {"task": name, "format": _format(args)}
    out = adapter.write(predictor, instruction, output, base=base,
                        provenance={**described, **source, "base_revision": revision})
    sha = json.loads((out / "hint_provenance.json").read_text())["instruction_sha256"]
    if source.get("run_id"):
        registry.tag_run(uri, source["run_id"], f"hint.adapter.{sha[:12]}", str(out))
    rank = json.loads((out / "adapter_config.json").read_text())["r"]
    base_arg = base or "BASE"
    print(f"hint adapter: {out} (task {name}, instruction sha256 {sha[:12]}, LoRA rank {rank})")
    print(f"  vLLM:   vllm serve {base_arg} --enable-lora --max-lora-rank {rank} "
          f"--lora-modules {name}={out}")
    print(f"  SGLang: python -m sglang.launch_server --model-path {base_arg} --enable-lora "
          f"--lora-paths {name}={out}")
    return 0


def _instruction(args) -> tuple[str, str]:
    """(the instruction text, the task's name) from --instruction or --task."""
    from hint_platform.errors import UserError
    from pipelines import formats
    from pipelines.bad_records import BadRecordError, BadRecords
    from pipelines.sni import load_task

    if args.instruction is not None:
        return args.instruction, args.name or "task"
    path = Path(args.task)
    if not path.is_file():
        raise UserError(f"--task {args.task}: no such file")
    try:
        task = load_task(str(path), BadRecords("error"))
    except BadRecordError as e:
        raise UserError(f"--task {e}") from None
    name = args.name or path.stem
    if args.format == "def":
        return formats.sni_def_hyper(task["Definition"]), name
    positives = (task.get("Positive Examples") or [])[:args.positives]
    for number, example in enumerate(positives):
        if not (isinstance(example, dict) and all(isinstance(example.get(k), str) for k in ("input", "output"))):
            raise UserError(f"--task {args.task}: 'Positive Examples'[{number}] needs an 'input' and "
                            "an 'output' text")
    # Every example is kept (training leaves out one that does not fit max_hyper_len): a text
    # that does not fit is refused when it is tokenised, with its length.
    return formats.sni_def_pos_hyper(task["Definition"], positives, args.positives,
                                     lambda text: True), name


def _format(args) -> str:
    """The --task format as the provenance records it: def, or def_pos:<positives>."""
    return args.format if args.format == "def" else f"def_pos:{args.positives}"


def _base(args, cfg) -> tuple[str | None, str | None]:
    """(--base as recorded, its revision); a local base directory is checked to fit the adapter.
    Without --base, the base the model was built from (serving.adapter.base_of)."""
    from hint_model.checkpoint import CheckpointError, hf_base
    from hint_model.peft_export import AdapterExportError, check_base
    from hint_platform.errors import UserError
    from hint_platform.serving.adapter import base_of

    if args.base is None:
        base, revision = base_of(cfg)
        return base, args.base_revision or revision
    base = Path(args.base)
    if not base.exists():
        return args.base, args.base_revision  # a hub name: recorded, not checked
    try:
        check_base(cfg, base)
    except (AdapterExportError, CheckpointError) as e:
        raise UserError(f"--base: {e}") from None
    _, revision = hf_base(base)  # the commit of a snapshot in the hub's cache
    return os.path.abspath(base), args.base_revision or revision
