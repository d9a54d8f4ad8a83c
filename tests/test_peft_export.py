"""A task's generated LoRA as a PEFT adapter: `peft.PeftModel.from_pretrained` over the same
base (transformers' own model, not ours) gives the HINT model's logits for that task, for every
decoder-only family; what cannot be a vLLM-loadable LoRA is refused, saying why."""

import json

import pytest
import torch
from hf_decoders import reference, right_padded
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hint_model import HintConfig, HintModel, TaskModules
from hint_model.peft_export import PROVENANCE, AdapterExportError, instruction_sha256

# family -> LoRA targets: GPT-2 stacks q and v in its fused c_attn (r = 2 x rank) and pads
# attn.c_proj (o) to that r; Llama's k / v have grouped-query (narrower) outputs.
TARGETS = {"gpt2": ["q", "v", "o"], "opt": ["q", "v"], "llama": ["q", "k", "v", "o"],
           "mistral": ["k", "o"], "qwen2": ["q", "v"]}
PROVENANCE_IN = {"instruction_sha256": instruction_sha256("Translate to French."),
                 "base_revision": "r1"}


def hint_and_task(tmp_path, family, variant="lora_only", **overrides):
    reference(family, tmp_path / "base")
    torch.manual_seed(0)
    model = HintModel.from_hf_checkpoint(tmp_path / "base", variant=variant, lora_rank=8,
                                         **overrides).eval()
    with torch.no_grad():  # generated LoRA large enough to move the logits well past 1e-4
        for mlp in model.generator.mlps.values():
            mlp.fc2.weight.mul_(30.0)
    instruction, _ = right_padded([7], seed=5)
    return model, model.generate_modules(instruction)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_peft_loads_the_task_as_the_hint_model_runs_it(tmp_path, family):
    model, modules = hint_and_task(tmp_path, family, lora_targets=TARGETS[family])
    out = model.save_peft_adapter(modules, tmp_path / "adapter", base_model_name_or_path="tiny-base",
                                  provenance=PROVENANCE_IN)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", PROVENANCE]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    ids, mask = right_padded([9, 4, 6], seed=3)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, modules=modules).logits
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4
    assert (theirs[real] - plain[real]).abs().max() > 1e-2  # the adapter changes the logits

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny-base"
    assert config["fan_in_fan_out"] == (family == "gpt2")
    assert config["lora_alpha"] / config["r"] == 1 / 8  # our scale: 1 / rank
    assert not config["use_dora"] and not config["modules_to_save"]
    assert config["r"] == (16 if family == "gpt2" else 8)
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance == {"base_model_name_or_path": "tiny-base", **PROVENANCE_IN}


def test_gpt2_fused_c_attn_is_one_peft_module(tmp_path):
    model, modules = hint_and_task(tmp_path, "gpt2", lora_targets=["q", "v", "o"])
    out = model.save_peft_adapter(modules, tmp_path / "adapter", base_model_name_or_path="b",
                                  provenance={})
    tensors = load_file(out / "adapter_model.safetensors")
    prefix = "base_model.model.transformer.h.0.attn."
    assert tensors[prefix + "c_attn.lora_A.weight"].shape == (16, 64)
    assert tensors[prefix + "c_attn.lora_B.weight"].shape == (192, 16)  # [q | k | v] x 2 ranks
    assert tensors[prefix + "c_attn.lora_B.weight"][64:128].abs().sum() == 0  # k: not a target
    assert tensors[prefix + "c_proj.lora_A.weight"][8:].abs().sum() == 0  # o: padded to r = 16
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (
        ["attn.c_proj", "c_attn"], ["c_attn", "attn.c_proj"])


@pytest.mark.parametrize("variant, why", [
    ("hint", "it uses adapters and prefixes and instruction fusion"),
    ("hint_no_fusion", "it uses adapters and prefixes"),
    ("concat", "it generates no LoRA"),
])
def test_variants_that_are_not_a_lora_are_refused(tmp_path, variant, why):
    reference("llama", tmp_path / "base")
    model = HintModel.from_hf_checkpoint(tmp_path / "base", variant=variant)
    instruction, _ = right_padded([5])
    with pytest.raises(AdapterExportError, match=f"variant {variant!r} cannot be a PEFT LoRA "
                                                 f"adapter: {why}.*vLLM removed prompt adapters"):
        model.save_peft_adapter(model.generate_modules(instruction), tmp_path / "adapter",
                                base_model_name_or_path="b", provenance={})
    assert not (tmp_path / "adapter").exists()


def test_a_t5_is_refused(tmp_path):
    model = HintModel(HintConfig.preset("tiny", variant="lora_only", vocab_size=50))
    modules = model.generate_modules(torch.randint(2, 50, (1, 4)))
    with pytest.raises(AdapterExportError, match="a t5 model has no causal-LM PEFT adapter"):
        model.save_peft_adapter(modules, tmp_path / "a", base_model_name_or_path="b", provenance={})


def test_bad_rank_and_target_directory_are_named(tmp_path):
    model, modules = hint_and_task(tmp_path, "gpt2", lora_targets=["q", "k", "v"])
    with pytest.raises(AdapterExportError, match=r"LoRA rank 24 \(lora_rank=8 x the targets in "
                                                 r"GPT-2 c_attn\) is not one of vLLM's ranks 8, 16"):
        model.save_peft_adapter(modules, tmp_path / "a", base_model_name_or_path="b", provenance={})
    model, modules = hint_and_task(tmp_path / "2", "llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(AdapterExportError, match=f"adapter directory {tmp_path / 'full'} exists "
                                                 "and is not empty"):
        model.save_peft_adapter(modules, tmp_path / "full", base_model_name_or_path="b", provenance={})
    assert (tmp_path / "full" / "x").read_text() == "keep"
    (tmp_path / "empty").mkdir()  # an empty directory is taken
    model.save_peft_adapter(modules, tmp_path / "empty", base_model_name_or_path="b", provenance={})
    two = TaskModules.stack([modules, modules])
    with pytest.raises(AdapterExportError, match="one task"):
        model.save_peft_adapter(two, tmp_path / "two", base_model_name_or_path="b", provenance={})


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model, modules = hint_and_task(tmp_path, "llama")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("hint_model.peft_export.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_peft_adapter(modules, tmp_path / "out" / "adapter", base_model_name_or_path="b",
                                provenance={})
    assert list((tmp_path / "out").iterdir()) == []


def test_instruction_hash_is_the_sha256_of_its_utf8_text():
    assert instruction_sha256("abc") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert instruction_sha256("café") != instruction_sha256("cafe")
