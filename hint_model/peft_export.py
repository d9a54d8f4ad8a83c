"""A task's generated LoRA as a PEFT adapter directory (`peft.PeftModel.from_pretrained`, vLLM).

Writes what `PeftModel.save_pretrained` writes for a LoRA on the Hugging Face model of the
base: `adapter_config.json` and `adapter_model.safetensors` with PEFT's key names
(`base_model.model.<module>.lora_A.weight` [r, in], `lora_B.weight` [out, r]), plus
`hint_provenance.json` (which instruction, which base: PEFT's config keeps no extra keys).

Ours is x A B / rank per target; PEFT's is B(A(x)) * lora_alpha / r, so A and B are
transposed and lora_alpha = r / rank. Within vLLM's LoRA limits: one r and alpha for every
module, r in VLLM_RANKS, no modules_to_save, no DoRA. GPT-2's q, k, v are one Conv1D, c_attn
(its output is [q | k | v]); PEFT adapts it as one module (fan_in_fan_out: Conv1D stores
weights [in, out]), so the targets in it are stacked along r: A = [A_q; A_v], B block-diagonal
(each target's rows of the output read its own rank), r = (targets in c_attn) x rank; a
module with fewer targets (GPT-2's attn.c_proj) is padded with zeros to that r.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from hint_model import gpt2, llama, opt
from hint_model.checkpoint import read_hf_shapes, read_json
from hint_model.config import HintConfig
from hint_model.peft import lora_dims
from hint_model.task_modules import TaskModules

# vLLM's supported LoRA ranks (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)

# model_type -> (a layer's attention module, {its submodule: the projections in its output,
# in order}). GPT-2's c_attn computes [q | k | v] in one Conv1D.
FAMILY_MODULES = {
    "gpt2": ("transformer.h.{}.attn", {"c_attn": ("q", "k", "v"), "c_proj": ("o",)}),
    "opt": ("model.decoder.layers.{}.self_attn",
            {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "out_proj": ("o",)}),
    "llama": ("model.layers.{}.self_attn",
              {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",)}),
}

# config.json model_type of a Hugging Face base -> the family (our model_type) it loads as
BASE_MODEL_TYPES = {name: family.MODEL_TYPES[0] for family in (gpt2, opt, llama)
                    for name in family.MODEL_TYPES}

PROVENANCE = "hint_provenance.json"


def instruction_sha256(instruction: str) -> str:
    """The provenance key of an instruction: SHA-256 of its UTF-8 text, hex."""
    return hashlib.sha256(instruction.encode("utf-8")).hexdigest()


class AdapterExportError(ValueError):
    """A task that cannot be written as a PEFT LoRA adapter; the message says why."""


def check_exportable(cfg: HintConfig) -> None:
    """Refuse, before anything is generated, a model whose task modules are not a plain LoRA."""
    if cfg.model_type not in FAMILY_MODULES:
        raise AdapterExportError(
            f"a {cfg.model_type} model has no causal-LM PEFT adapter: export needs a decoder-only "
            f"base ({', '.join(FAMILY_MODULES)})")
    needs = [name for name, on in (("adapters", cfg.adapters), ("prefixes", cfg.prefixes),
                                   ("instruction fusion", cfg.fusion)) if on]
    if needs or not cfg.lora:
        why = f"it uses {' and '.join(needs)}" if needs else "it generates no LoRA"
        raise AdapterExportError(
            f"variant {cfg.variant!r} cannot be a PEFT LoRA adapter: {why}, which a LoRA cannot "
            "hold (vLLM removed prompt adapters); export a lora_only model")
    r = peft_rank(cfg)
    if r not in VLLM_RANKS:
        raise AdapterExportError(
            f"LoRA rank {r} (lora_rank={cfg.lora_rank}"
            f"{' x the targets in GPT-2 c_attn' if r != cfg.lora_rank else ''}) is not one of "
            f"vLLM's ranks {', '.join(map(str, VLLM_RANKS))}")


def target_modules(cfg: HintConfig) -> dict[str, tuple[str, ...]]:
    """Each adapted submodule -> the targets it holds, in the order of its output."""
    _, submodules = FAMILY_MODULES[cfg.model_type]
    return {name: parts for name, parts in submodules.items()
            if any(t in cfg.lora_targets for t in parts)}


def peft_rank(cfg: HintConfig) -> int:
    """The adapter's r: the rank, times the targets stacked in one module (GPT-2's c_attn)."""
    held = [sum(t in cfg.lora_targets for t in parts) for parts in target_modules(cfg).values()]
    return max(held) * cfg.lora_rank


def module_shapes(cfg: HintConfig) -> dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """Each adapted module's name in the Hugging Face base -> (its weight's shape there, lora_A's
    shape, lora_B's shape), every layer."""
    path, _ = FAMILY_MODULES[cfg.model_type]
    r = peft_rank(cfg)
    out = {}
    for name, parts in target_modules(cfg).items():
        fan_in, fan_out = lora_dims(cfg, parts[0])[0], sum(lora_dims(cfg, t)[1] for t in parts)
        weight = (fan_in, fan_out) if cfg.model_type == "gpt2" else (fan_out, fan_in)  # Conv1D: [in, out]
        for layer in range(cfg.num_layers):
            out[f"{path.format(layer)}.{name}"] = (weight, (r, fan_in), (fan_out, r))
    return out


def adapter_nbytes(cfg: HintConfig) -> int:
    """Bytes of the adapter's tensors (fp32), known from the config before anything is generated."""
    return 4 * sum(a[0] * a[1] + b[0] * b[1] for _, a, b in module_shapes(cfg).values())


def check_base(cfg: HintConfig, base_dir: str | Path) -> None:
    """Refuse a Hugging Face base directory the adapter does not fit: another family, more
    layers, or attention modules that are not the config's targets (absent, or of another
    shape). Reads config.json and the safetensors headers, no weights."""
    base_dir = Path(base_dir)
    model_type = read_json(base_dir).get("model_type")
    if BASE_MODEL_TYPES.get(model_type) != cfg.model_type:
        raise AdapterExportError(
            f"base {base_dir} is a {model_type} model; the adapter is for a {cfg.model_type} base "
            f"({', '.join(t for t, f in BASE_MODEL_TYPES.items() if f == cfg.model_type)})")
    shapes = read_hf_shapes(base_dir)
    targets = f"lora_targets {cfg.lora_targets} of a {cfg.num_layers}-layer model"
    for module, (weight, _, _) in module_shapes(cfg).items():
        found = shapes.get(f"{module}.weight")
        if found is None:
            raise AdapterExportError(f"base {base_dir} has no {module}.weight: its attention "
                                     f"modules are not the adapter's {targets}")
        if found != weight:
            raise AdapterExportError(f"base {base_dir}: {module}.weight is {list(found)}, the "
                                     f"adapter's {targets} need {list(weight)}")
    beyond = FAMILY_MODULES[cfg.model_type][0].format(cfg.num_layers) + "."
    if any(name.startswith(beyond) for name in shapes):
        raise AdapterExportError(f"base {base_dir} has more layers than the adapter's "
                                 f"{cfg.num_layers} ({beyond}* exists)")


def adapter_tensors(cfg: HintConfig, modules: TaskModules) -> dict[str, Tensor]:
    """PEFT's state dict of one task's LoRA (TaskModules of one task row)."""
    path, _ = FAMILY_MODULES[cfg.model_type]
    r, rank = peft_rank(cfg), cfg.lora_rank
    dims = {t: lora_dims(cfg, t) for t in "qkvo"}
    like = modules.peft[f"lora_{cfg.lora_targets[0]}_a"]
    out = {}
    for layer in range(cfg.num_layers):
        for name, parts in target_modules(cfg).items():
            a = like.new_zeros(r, dims[parts[0]][0])
            b = like.new_zeros(sum(dims[t][1] for t in parts), r)
            row, block = 0, 0  # the output rows and the rank block of the next target
            for t in parts:
                if t in cfg.lora_targets:
                    ranks = slice(block * rank, (block + 1) * rank)
                    a[ranks] = modules.peft[f"lora_{t}_a"][0, layer].T
                    b[row:row + dims[t][1], ranks] = modules.peft[f"lora_{t}_b"][0, layer].T
                    block += 1
                row += dims[t][1]
            key = f"base_model.model.{path.format(layer)}.{name}"
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a, b
    return out


def adapter_config(cfg: HintConfig, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json: the fields of PEFT's LoraConfig that say what this adapter is (PEFT
    fills the rest with its defaults). Written by hand: importing peft here would pull
    transformers into every process that imports the model."""
    r = peft_rank(cfg)
    # GPT-2's attn.c_proj named with its parent: "c_proj" alone would also adapt mlp.c_proj
    names = [("attn." + name if name == "c_proj" else name) for name in target_modules(cfg)]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "r": r, "lora_alpha": r // cfg.lora_rank,
        "lora_dropout": 0.0, "bias": "none", "target_modules": names,
        "fan_in_fan_out": cfg.model_type == "gpt2", "use_dora": False, "use_rslora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }


def save_adapter(cfg: HintConfig, modules: TaskModules, directory: str | Path,
                 base_model_name_or_path: str | None, provenance: dict[str, str]) -> Path:
    """Write one task's LoRA as a PEFT adapter directory; return its path.

    Written into a temporary directory beside `directory` and renamed when complete, so that
    a reader never sees half an adapter. `provenance` (e.g. instruction_sha256, base_revision,
    the model's registry name / version or run id) goes to hint_provenance.json."""
    check_exportable(cfg)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise AdapterExportError(f"adapter directory {directory} exists and is not empty")
    if modules.num_tasks != 1 or modules.instruction_key is not None:
        raise AdapterExportError("save_adapter takes the modules of one task, without fusion "
                                 f"(got {modules.num_tasks} task rows)")
    missing = [f"lora_{t}_{m}" for t in cfg.lora_targets for m in "ab"
               if f"lora_{t}_{m}" not in modules.peft]
    if missing:
        raise AdapterExportError(f"the task modules lack {', '.join(missing)} (lora_targets "
                                 f"{cfg.lora_targets}): modules of another model?")
    tensors = {k: v.detach().float().cpu().contiguous()
               for k, v in adapter_tensors(cfg, modules).items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would keep a server of another user out
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_model.safetensors").chmod(0o644)  # safetensors writes it 0600
        (staging / "adapter_config.json").write_text(
            json.dumps(adapter_config(cfg, base_model_name_or_path), indent=2) + "\n")
        (staging / PROVENANCE).write_text(json.dumps(
            {"base_model_name_or_path": base_model_name_or_path, **provenance}, indent=2) + "\n")
        os.replace(staging, directory)  # onto nothing or an empty directory (checked above)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
