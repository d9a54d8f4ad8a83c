"""Experiment configs: typed, validated data.

A config is a YAML file with four sections (model, data, train, run) plus a name. The configs
the platform ships (hint_platform/configs/: the demo, the paper's setups) are found by name
(`paper/hint-3b-sni-def`) as well as by path, so a wheel install has them too.
Every section is a dataclass; an unknown key or a value of the wrong type is an error that
names the key and lists what is valid. `key=value` overrides from the command line use dotted
paths (`train.max_steps=20`, `model.variant=concat`) and are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hint_model import HintConfig, HintConfigError
from hint_platform.errors import UserError

SHIPPED = Path(__file__).resolve().parent / "configs"


class ConfigError(UserError, ValueError):
    """A config that does not validate: the message names the key and what is valid."""


@dataclass
class ModelSection:
    preset: str = "tiny"  # size preset of hint_model.HintConfig
    variant: str = "hint"  # ablation / baseline preset of hint_model.HintConfig
    overrides: dict[str, Any] = field(default_factory=dict)  # any HintConfig field
    # A Hugging Face T5 checkpoint directory, or the export directory of an earlier stage.
    init_from: str | None = None


@dataclass
class DataSection:
    tokenizer: str = ""  # a directory holding spiece.model (or tokenizer.json)
    # Sources as pipelines.SourceSpec fields (kind, path, format, weight, ...).
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    max_input_len: int = 1024
    max_hyper_len: int = 1024
    max_target_len: int = 256
    on_bad_record: str = "error"  # error | skip
    seed: int = 0


@dataclass
class TrainSection:
    num_workers: int = 1
    cpus_per_worker: float = 0.5  # fractional on a laptop: Ray Data needs CPUs too
    use_gpu: bool = False
    global_batch_size: int = 1024  # examples per optimizer step, over all workers
    micro_batch_size: int = 8  # examples per worker per forward/backward
    max_steps: int = 1000  # optimizer steps
    optimizer: str = "adafactor"  # adafactor | adamw
    lr: float = 1e-3
    # The learning rate over the steps: linear warmup from 0 over `warmup_steps`, then constant
    # (the paper's Adafactor runs) or linear decay to 0 at max_steps (Appendix D's AdamW runs).
    lr_schedule: str = "constant"  # constant | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clipping; 0 disables it (the paper configs)
    # t5x's z-loss on the logits, z_loss * logsumexp(logits)**2 per target token (reference
    # gins/hyper_base.gin Z_LOSS); 0 turns it off. The reported eval_loss leaves it out.
    z_loss: float = 1e-4
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each T5 block and the generator's parts (regional)
    fsdp: bool = True
    # FSDP frees each block's gathered weights after its forward and gathers them again for
    # backward (ZeRO-3's memory). False keeps them to backward: one all-gather fewer per block
    # and step, for a model whose whole weights fit beside the activations (the demo's: 17%
    # of a 2-worker CPU step of T5 HINT-tiny).
    reshard_after_forward: bool = True
    checkpoint_every: int = 100  # steps; 0 = only at the end
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = only at the end (data.eval's mean token loss, `eval_loss`)
    # The first N examples of the data.eval stream, the same N every time (a test part goes task
    # by task: lower the sources' max_per_task to cover more tasks).
    eval_examples: int = 256
    max_failures: int = 1
    seed: int = 0
    # With model.init_from an export that carries its optimizer state (optimizer.safetensors):
    # continue it, as the reference restores Adafactor's moments and step between stages.
    restore_optimizer: bool = True


@dataclass
class RunSection:
    storage_path: str = "runs"  # run directory (relative paths are made absolute)
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite under storage_path
    experiment: str = "hint"
    register_as: str | None = None  # registered model name for the final export
    # How long the end of a run retries an unreachable tracking server (its buffered metrics,
    # the export upload) before it finishes without them, saying what was not logged.
    tracking_retry_s: float = 300.0


@dataclass
class ExperimentConfig:
    name: str = "hint-run"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the form MLflow params use (`model.overrides` is one value)."""
        return flatten(self.to_dict(), whole=("overrides",))

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> "ExperimentConfig":
        """A copy with dotted-key overrides applied (a dict, or `key=value` strings)."""
        data = self.to_dict()
        for key, value in _parse_overrides(overrides).items():
            _set_dotted(data, key, value)
        return from_dict(data)


_CHOICES = {
    "data.on_bad_record": ("error", "skip"),
    "train.optimizer": ("adafactor", "adamw"),
    "train.lr_schedule": ("constant", "linear"),
}


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, data, prefix="")
    _check(cfg)
    return cfg


def load(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> ExperimentConfig:
    """The config at `path`, or the shipped config of that name (`demo/finetune`)."""
    path = find(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping, got {type(data).__name__}")
    try:
        cfg = from_dict(data)
        return cfg.with_overrides(overrides) if overrides else cfg
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def find(name: str | Path) -> Path:
    """A config file: `name` as a path, else a config the platform ships (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = SHIPPED / (path if path.suffix else path.with_suffix(".yaml"))
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {name} (nor a shipped config; `hint configs` "
                      "lists them)")


def shipped_configs() -> list[str]:
    """The names of the configs the platform ships, e.g. `paper/hint-3b-sni-def`."""
    return sorted(str(p.relative_to(SHIPPED).with_suffix("")) for p in SHIPPED.rglob("*.yaml"))


def model_config(cfg: ExperimentConfig, vocab_size: int | None = None) -> HintConfig:
    """The HintConfig of `cfg.model` (preset, then variant, then overrides): the one place an
    experiment config becomes a model config. `vocab_size` (the tokenizer's) applies unless the
    overrides set one. A model section that does not build is a ConfigError naming it."""
    m = cfg.model
    # The model remembers the output length it trains for: generation's default length.
    overrides = {"max_target_len": cfg.data.max_target_len, **m.overrides}
    if vocab_size is not None:
        overrides.setdefault("vocab_size", vocab_size)
    try:
        return HintConfig.preset(m.preset, variant=m.variant, **overrides)
    except (HintConfigError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def is_decoder_only(cfg: ExperimentConfig) -> bool:
    """Whether the model `cfg` trains is decoder-only, which decides the data's layout (the
    causal one of `pipelines`: the platform chooses it from the model, never the user). The
    model is `model.init_from`'s when that is a local directory (a Hugging Face checkpoint's
    `model_type`, or an export's HintConfig), else the preset's with the overrides."""
    init_from = Path(cfg.model.init_from or "") / "config.json"
    if cfg.model.init_from and "://" not in cfg.model.init_from and init_from.is_file():
        try:
            data = json.loads(init_from.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.init_from: {init_from} is not valid JSON: {e}") from None
        export = data.get("format") == "hint"
        model_type = data.get("config", {}).get("model_type", "t5") if export else data.get("model_type")
        return model_type != "t5"
    return model_config(cfg).is_decoder_only


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:  # PyYAML reads `1e-3` (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


# Counts and sizes: a 0 would divide by zero or train nothing. Every other number of the train
# section (and the seeds, the intervals where 0 means "only at the end") is 0 or more.
_POSITIVE = ("train.num_workers", "train.cpus_per_worker", "train.global_batch_size",
             "train.micro_batch_size", "train.max_steps", "train.log_every", "train.eval_examples",
             "train.lr", "data.max_input_len", "data.max_hyper_len", "data.max_target_len")
_NOT_NEGATIVE = ("train.checkpoint_every", "train.eval_every", "train.max_failures",
                 "train.seed", "train.z_loss", "train.grad_clip", "train.weight_decay", "train.warmup_steps",
                 "data.seed", "run.tracking_retry_s")
# Names become directories (run name), MLflow filter strings and registry names: one safe
# alphabet, no path separators, no quotes, no "..".
_NAMES = ("name", "run.experiment", "run.register_as")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _check(cfg: ExperimentConfig) -> None:
    flat = cfg.flat()
    for key, valid in _CHOICES.items():
        if flat[key] not in valid:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(valid)}")
    for key in _POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"{key}: must be positive, got {flat[key]}")
    for key in _NOT_NEGATIVE:
        if flat[key] < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {flat[key]}")
    for key in _NAMES:
        if flat[key] is not None and (not _NAME.fullmatch(flat[key]) or ".." in flat[key]):
            raise ConfigError(f"{key}: {flat[key]!r} is not a valid name: use 1 to 100 letters, "
                              "digits, '.', '_' or '-', starting with a letter or digit, no '..'")
    t = cfg.train
    per_step = t.num_workers * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.num_workers x train.micro_batch_size ({per_step})"
        )


def flatten(data: dict[str, Any], prefix: str = "", whole: tuple[str, ...] = ()) -> dict[str, Any]:
    """Nested mappings -> dotted keys; a mapping under a key in `whole` stays one value."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key not in whole:
            out.update(flatten(value, f"{prefix}{key}.", whole))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _parse_overrides(overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    if isinstance(overrides, dict):
        return overrides
    parsed = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=20")
        key, raw = item.split("=", 1)
        parsed[key.strip()] = yaml.safe_load(raw) if raw else ""
    return parsed


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if part == "overrides":  # model.overrides.<HintConfig field>
            node = node.setdefault(part, {})
            node[".".join(parts[i + 1:])] = value
            return
        if not isinstance(node.get(part), dict):
            valid = ", ".join(sorted(k for k, v in node.items() if isinstance(v, dict)))
            raise ConfigError(f"unknown key {key}: no section {part!r} (sections: {valid})")
        node = node[part]
    if parts[-1] not in node:
        where = ".".join(parts[:-1]) or "the top level"
        raise ConfigError(f"unknown key {key}; valid keys under {where}: {', '.join(sorted(node))}")
    node[parts[-1]] = value
