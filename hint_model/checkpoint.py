"""Files: Hugging Face checkpoints in (T5, and the decoder-only families through their
`key_map`s), our own export format in and out.

Hugging Face: `config.json` + `model.safetensors`, or `model.safetensors.index.json` and its
shards. Every tensor goes through a strict key map: a missing key, a key we do not know, or a
shape that does not match is an error naming the key and the file, raised before anything is
copied (nothing loads half-way). Pickle files (`pytorch_model.bin`) are refused.

Ours: `config.json` ({"format": "hint", "config": HintConfig fields}) + `model.safetensors`
(the HintModel state dict under its own names). Loaded as saved, strictly; or into a model of
another variant (HintModel.from_pretrained), where tensors of the same name must have the same
shape and the rest is dropped or freshly initialised, as a LoadReport says.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from hint_model.config import HintConfig

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"

# Keys a Hugging Face T5 file may hold that carry nothing we need: copies of `shared`, and a
# cross-attention position bias that T5 never uses.
_HF_IGNORED = re.compile(r"(encoder|decoder)\.embed_tokens\.weight"
                         r"|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the key."""


def hf_name(ours: str) -> str:
    """Our T5 parameter name (relative to HintModel.t5) -> the Hugging Face T5 name."""
    if ours in ("shared.weight", "lm_head.weight"):
        return ours
    stack, rest = ours.split(".", 1)
    if rest == "relative_bias.weight":
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if rest == "final_norm.weight":
        return f"{stack}.final_layer_norm.weight"
    _, i, part = rest.split(".", 2)
    ffn_layer = 2 if stack == "decoder" else 1
    for ours_prefix, theirs in (("attn_norm.", "layer.0.layer_norm."), ("attn.", "layer.0.SelfAttention."),
                                ("cross_norm.", "layer.1.layer_norm."), ("cross_attn.", "layer.1.EncDecAttention."),
                                ("ffn_norm.", f"layer.{ffn_layer}.layer_norm."),
                                ("ffn.", f"layer.{ffn_layer}.DenseReluDense.")):
        if part.startswith(ours_prefix):
            return f"{stack}.block.{i}.{theirs}{part[len(ours_prefix):]}"
    raise KeyError(f"no Hugging Face name for T5 parameter {ours!r}")


def read_t5_checkpoint(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(HintConfig fields of the T5 shape, tensors by Hugging Face name) of a T5 directory."""
    directory = Path(directory)
    hf = read_json(directory)
    if hf.get("model_type") != "t5":
        raise CheckpointError(f"{directory / CONFIG}: model_type is {hf.get('model_type')!r}, "
                              "expected 't5'")
    return t5_fields(hf, read_hf_tensors(directory), where=directory / CONFIG)


def t5_fields(hf: dict, state: dict[str, Tensor], where: str | Path = "T5 config") -> tuple[dict, dict[str, Tensor]]:
    """HintConfig fields from a Hugging Face T5 config dict; drops a tied lm head from state."""
    try:
        fields = dict(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"],
                      d_ff=hf["d_ff"], num_layers=hf["num_layers"], num_heads=hf["num_heads"])
    except KeyError as e:
        raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
    fields.update(
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        feed_forward_proj=hf.get("feed_forward_proj", "relu"),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        pad_token_id=hf.get("pad_token_id", 0), eos_token_id=hf.get("eos_token_id", 1),
        # The decoder-output rescale: explicit in recent files, else implied by tying (v1.0).
        scale_decoder_outputs=bool(hf.get("scale_decoder_outputs",
                                          hf.get("tie_word_embeddings", True) is not False)),
    )
    # Tied iff there is no separate lm head (or one equal to the embedding).
    state = dict(state)
    head = state.get("lm_head.weight")
    fields["tie_word_embeddings"] = head is None or (
        "shared.weight" in state and torch.equal(head, state["shared.weight"]))
    if fields["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    return fields, state


def load_t5_weights(t5: nn.Module, state: dict[str, Tensor], directory: str | Path) -> None:
    """Copy Hugging Face tensors into our T5 module, all or nothing."""
    where = Path(directory)
    ours = t5.state_dict()
    wanted = {hf_name(name): name for name in ours}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s), first {missing[0]!r}")
    unknown = sorted(k for k in set(state) - set(wanted) if not _HF_IGNORED.fullmatch(k))
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensor {unknown[0]!r} (not part of a T5 "
                              f"with this config; {len(unknown)} in all)")
    for theirs, name in wanted.items():
        if state[theirs].shape != ours[name].shape:
            raise CheckpointError(f"{where}: {theirs} has shape {tuple(state[theirs].shape)}, "
                                  f"the config gives {tuple(ours[name].shape)}")
    with torch.no_grad():
        for theirs, name in wanted.items():
            ours[name].copy_(state[theirs])


# A decoder-only family's map: Hugging Face name -> (our parameter names, whether the file stores
# them transposed). Several names are concatenated along their first dimension (GPT-2's fused
# c_attn = q | k | v); "transposed" is GPT-2's Conv1D, whose weights are [in, out].
KeyMap = dict[str, tuple[tuple[str, ...], bool]]


def hf_tensors(key_map: KeyMap, ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our tensors under their Hugging Face names and layouts (the inverse of load_mapped)."""
    out = {}
    for theirs, (names, transposed) in key_map.items():
        t = torch.cat([ours[n] for n in names]) if len(names) > 1 else ours[names[0]]
        out[theirs] = t.T if transposed and t.dim() == 2 else t
    return out


def load_mapped(module: nn.Module, key_map: KeyMap, state: dict[str, Tensor], where: str | Path,
                tied_head: bool) -> None:
    """Copy Hugging Face tensors into `module` through its key map, all or nothing: a missing
    tensor, one we do not know or one of another shape is an error naming it. A tied model's
    `lm_head.weight` is dropped when present: the embedding is its head (as transformers ties it)."""
    ours = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in hf_tensors(
        key_map, {k: v.to("meta") for k, v in ours.items()}).items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s), first {missing[0]!r}")
    ignored = {"lm_head.weight"} if tied_head else set()
    unknown = sorted(set(state) - set(expected) - ignored)
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensor {unknown[0]!r} (not part of a model "
                              f"with this config; {len(unknown)} in all)")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(state[name].shape)}, the "
                                  f"config gives {shape}")
    with torch.no_grad():
        for theirs, (names, transposed) in key_map.items():
            t = state[theirs].T if transposed and state[theirs].dim() == 2 else state[theirs]
            for name, part in zip(names, t.split([ours[n].shape[0] for n in names])):
                ours[name].copy_(part)


def save_pretrained(cfg: HintConfig, state_dict: dict[str, Tensor], directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps({"format": "hint", "config": cfg.to_dict()}, indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})


def read_pretrained(directory: str | Path) -> tuple[HintConfig, dict[str, Tensor]]:
    return read_config(directory), _read_safetensors(Path(directory) / WEIGHTS)


def read_config(directory: str | Path) -> HintConfig:
    """The HintConfig of an export, without reading its weights."""
    directory = Path(directory)
    data = read_json(directory)
    if data.get("format") != "hint":
        loader = "from_t5_checkpoint" if data.get("model_type") == "t5" else "from_hf_checkpoint"
        hint = (f" (a Hugging Face {data['model_type']} checkpoint: use HintModel.{loader})"
                if data.get("model_type") else "")
        raise CheckpointError(f"{directory / CONFIG}: not a hint model export{hint}")
    try:
        return HintConfig.from_dict(data["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG}: {e}") from None


def load_strict(model: nn.Module, state: dict[str, Tensor], where: Path) -> None:
    ours = model.state_dict()
    missing, unknown = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s), first {missing[0]!r}")
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensor {unknown[0]!r} ({len(unknown)} in all)")
    for name, tensor in state.items():
        if tensor.shape != ours[name].shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(tensor.shape)}, the config "
                                  f"gives {tuple(ours[name].shape)}")
    model.load_state_dict(state)


@dataclass
class LoadReport:
    """What loading an export into a model of another variant did: the export's tensors the
    model has no place for (dropped) and the model's parameters the export lacks (freshly
    initialised, as in a new model)."""

    dropped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not (self.dropped or self.initialised):
            return "every tensor loaded"
        return "; ".join(f"{verb} {len(keys)} tensor(s): {', '.join(_grouped(keys))}"
                         for verb, keys in (("dropped", self.dropped),
                                            ("freshly initialised", self.initialised)) if keys)


def match_shapes(ours: dict[str, tuple], theirs: dict[str, tuple], where: Path) -> LoadReport:
    """The report of loading tensors of shapes `theirs` into parameters of shapes `ours`; a
    tensor both have with different shapes is an error naming it (nothing is loaded)."""
    for name in sorted(set(ours) & set(theirs)):
        if tuple(theirs[name]) != tuple(ours[name]):
            raise CheckpointError(f"{where}: {name} has shape {tuple(theirs[name])}, the model "
                                  f"asked for has {tuple(ours[name])}: not the same model shape")
    return LoadReport(dropped=sorted(set(theirs) - set(ours)),
                      initialised=sorted(set(ours) - set(theirs)))


def load_matching(model: nn.Module, state: dict[str, Tensor], where: Path) -> LoadReport:
    """Loads every tensor of `state` the model has (shapes checked first, all or nothing) and
    leaves the model's other parameters as they were initialised."""
    ours = model.state_dict()
    report = match_shapes({k: tuple(v.shape) for k, v in ours.items()},
                          {k: tuple(v.shape) for k, v in state.items()}, where)
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=False)
    return report


def read_pretrained_shapes(directory: str | Path) -> tuple[HintConfig, dict[str, tuple]]:
    """(config, tensor shapes) of an export, read from the safetensors header only."""
    directory = Path(directory)
    cfg = read_config(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return cfg, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


def _grouped(keys: list[str]) -> list[str]:
    """Tensor names as a person reads them: `generator.mlps.prefix_key.*` for its 2 tensors."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        prefix = ".".join(parts[:3]) + (".*" if len(parts) > 3 else "")
        groups[prefix] = groups.get(prefix, 0) + 1
    named = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    return named if len(named) <= 8 else [*named[:8], f"... ({len(named) - 8} more groups)"]


def hf_base(directory: str | Path) -> tuple[str, str | None]:
    """(name, revision) of a Hugging Face checkpoint directory as a model's base: in the hub's
    cache (.../models--ORG--NAME/snapshots/COMMIT, or models--NAME without an organisation) its
    hub name ORG/NAME and the commit, else its absolute path and no revision. Not config.json's
    `_name_or_path`: transformers no longer writes it, and where an older one did, it names what
    the weights were loaded from before they were saved here, fine-tuned since or not."""
    path = Path(os.path.abspath(directory))
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--") and repo != "models--":
        return repo.removeprefix("models--").replace("--", "/"), path.name  # the hub forbids "--" in names
    return str(path), None


def read_json(directory: str | Path) -> dict:
    """The config.json of a checkpoint directory, as a dict."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_hf_tensors(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face directory (one safetensors file or sharded); pickle refused."""
    state: dict[str, Tensor] = {}
    for path, listed in _hf_weight_files(Path(directory)):
        tensors = _read_safetensors(path)
        _check_listed(path, listed, tensors)
        state.update(tensors)
    return state


def read_hf_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a Hugging Face directory, from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, listed in _hf_weight_files(Path(directory)):
        try:
            with safe_open(str(path), framework="pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
        _check_listed(path, listed, found)
        shapes.update(found)
    return shapes


def _hf_weight_files(directory: Path) -> list[tuple[Path, set[str] | None]]:
    """The safetensors files of a Hugging Face directory, each with the tensors its index lists
    in it (None: a single file, no index)."""
    if (directory / WEIGHTS).is_file():
        return [(directory / WEIGHTS, None)]
    index = directory / INDEX
    if not index.is_file():
        pickled = " (pytorch_model.bin is pickle: convert it to safetensors)" if (
            directory / "pytorch_model.bin").exists() else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS} and no {INDEX}{pickled}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    return [(directory / shard, {k for k, v in weight_map.items() if v == shard})
            for shard in sorted(set(weight_map.values()))]


def _check_listed(path: Path, listed: set[str] | None, found) -> None:
    absent = sorted((listed or set()) - set(found))
    if absent:
        raise CheckpointError(f"{path}: {absent[0]!r} is listed in {INDEX} but not in the shard")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
