"""TaskModules: generate once per task, save / load, and the same answers as uncached."""

import pytest
import torch
from safetensors.torch import save_file

from hint_model import CheckpointError, HintConfig, HintModel, TaskModules

VOCAB = 100


def model_and_task(variant="hint"):
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("tiny", variant=variant, vocab_size=VOCAB)).eval()
    instruction = torch.randint(2, VOCAB, (1, 7))
    inputs = torch.randint(2, VOCAB, (5, 6))
    mask = torch.ones_like(inputs)
    inputs[2, 4:], mask[2, 4:] = 0, 0
    return model, instruction, inputs, mask


@pytest.mark.parametrize("variant", ["hint", "lora_only", "static_peft", "concat"])
def test_cached_modules_give_what_the_uncached_path_gives(variant):
    model, instruction, inputs, mask = model_and_task(variant)
    hyper = dict(hyper_input_ids=instruction.expand(5, -1),
                 hyper_attention_mask=torch.ones(5, 7, dtype=torch.long))
    modules = model.generate_modules(instruction, torch.ones_like(instruction))
    labels = torch.randint(2, VOCAB, (5, 4))
    labels[0, 3] = -100

    uncached = model.generate(inputs, mask, max_new_tokens=6, **hyper)
    cached = model.generate(inputs, mask, modules=modules, max_new_tokens=6)
    assert torch.equal(uncached, cached)
    with torch.no_grad():
        torch.testing.assert_close(model.score(inputs, mask, labels, **hyper),
                                   model.score(inputs, mask, labels, modules=modules))


def test_modules_round_trip_through_safetensors(tmp_path):
    model, instruction, inputs, mask = model_and_task()
    modules = model.generate_modules(instruction)
    path = tmp_path / "task.safetensors"
    modules.save(path)
    loaded = TaskModules.load(path)
    assert set(loaded.peft) == {"adapter_down", "adapter_down_bias", "adapter_up",
                                "adapter_up_bias", "prefix_key", "prefix_value"}
    for kind, tensor in modules.peft.items():
        assert torch.equal(tensor, loaded.peft[kind])
    for name in ("instruction_key", "instruction_value", "instruction_mask"):
        assert torch.equal(getattr(loaded, name), getattr(modules, name))
    for batch in (1, 5):  # one task's modules serve batches of any size
        assert torch.equal(model.generate(inputs[:batch], mask[:batch], modules=modules),
                           model.generate(inputs[:batch], mask[:batch], modules=loaded))


def test_generating_modules_takes_one_instruction():
    model, instruction, _, _ = model_and_task()
    with pytest.raises(ValueError, match="one instruction"):
        model.generate_modules(instruction.expand(2, -1))


def test_a_foreign_file_is_not_loaded_as_modules(tmp_path):
    model, *_ = model_and_task("concat")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a TaskModules file"):
        TaskModules.load(tmp_path / "model.safetensors")


@pytest.mark.parametrize("variant", ["hint", "untied_encoder", "static_peft"])
def test_save_pretrained_round_trip(tmp_path, variant):
    model, instruction, inputs, mask = model_and_task(variant)
    model.save_pretrained(tmp_path)
    loaded = HintModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    hyper = dict(hyper_input_ids=instruction.expand(5, -1))
    with torch.no_grad():
        assert torch.equal(model(inputs, mask, decoder_input_ids=inputs, **hyper).logits,
                           loaded(inputs, mask, decoder_input_ids=inputs, **hyper).logits)


def test_export_with_the_wrong_shapes_is_refused(tmp_path):
    model, *_ = model_and_task()
    model.save_pretrained(tmp_path)
    other = HintModel(HintConfig.preset("tiny", variant="hint", vocab_size=VOCAB, adapter_size=3))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="adapter_down.* has shape"):
        HintModel.from_pretrained(tmp_path)
