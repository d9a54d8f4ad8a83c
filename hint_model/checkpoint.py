"""Files: Hugging Face T5 checkpoints in, our own export format in and out.

Hugging Face: `config.json` + `model.safetensors`, or `model.safetensors.index.json` and its
shards. Every tensor goes through a strict key map: a missing key, a key we do not know, or a
shape that does not match is an error naming the key and the file, raised before anything is
copied (nothing loads half-way). Pickle files (`pytorch_model.bin`) are refused.

Ours: `config.json` ({"format": "hint", "config": HintConfig fields}) + `model.safetensors`
(the HintModel state dict under its own names).
"""

from __future__ import annotations

import json
import re
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
    hf = _read_config(directory)
    if hf.get("model_type") != "t5":
        raise CheckpointError(f"{directory / CONFIG}: model_type is {hf.get('model_type')!r}, "
                              "expected 't5'")
    return t5_fields(hf, _read_hf_tensors(directory), where=directory / CONFIG)


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
    data = _read_config(directory)
    if data.get("format") != "hint":
        hint = (" (a Hugging Face T5 checkpoint: use HintModel.from_t5_checkpoint)"
                if data.get("model_type") == "t5" else "")
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


def _read_config(directory: Path) -> dict:
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


def _read_hf_tensors(directory: Path) -> dict[str, Tensor]:
    if (directory / WEIGHTS).is_file():
        return _read_safetensors(directory / WEIGHTS)
    index = directory / INDEX
    if not index.is_file():
        pickled = " (pytorch_model.bin is pickle: convert it to safetensors)" if (
            directory / "pytorch_model.bin").exists() else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS} and no {INDEX}{pickled}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = _read_safetensors(directory / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        absent = sorted(listed - set(tensors))
        if absent:
            raise CheckpointError(f"{directory / shard}: {absent[0]!r} is listed in {INDEX} "
                                  "but not in the shard")
        state.update(tensors)
    return state


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
