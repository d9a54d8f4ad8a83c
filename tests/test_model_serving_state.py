"""What serving relies on: the fused instruction's keys/values computed once per task give the
logits of recomputing them from the concatenated memory, a mixed-task batch gives each
example its own task's results, and greedy / beam decoding with the model's target length."""

import pytest
import torch

from hint_model import HintConfig, HintModel, TaskModules, peft
from hint_model.t5 import padding_bias
from tests.test_model_parity import batch, hf_t5

VOCAB = 100


def tiny(variant="hint", **overrides):
    torch.manual_seed(0)
    return HintModel(HintConfig.preset("tiny", variant=variant, vocab_size=VOCAB, **overrides)).eval()


def inputs(rows=4, width=6, seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(2, VOCAB, (rows, width))
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("variant", ["hint", "lora_only", "hint_no_peft"])
@torch.no_grad()
def test_fused_instruction_cache_gives_the_logits_of_recomputing_it(variant):
    """Reference: the paper's fusion written out, the decoder cross-attending to
    concat([encoded instruction, encoded input]) with the instruction re-projected per input."""
    model = tiny(variant, fusion=True)
    instruction = torch.randint(2, VOCAB, (1, 9))
    ids, mask = inputs()
    decoder_ids = torch.randint(2, VOCAB, (4, 5))
    modules = model.generate_modules(instruction)
    assert modules.instruction_key.shape == (1, 2, 9, model.config.inner_dim)

    cached = model(ids, mask, decoder_input_ids=decoder_ids, modules=modules).logits

    states = model.t5.encoder(model.t5.shared(instruction), padding_bias(torch.ones_like(instruction), torch.float32))
    index = torch.zeros(4, dtype=torch.long)
    encoder_peft, decoder_peft = peft.split_by_block(
        modules.peft, index, model.config.num_layers, model.config.num_decoder_layers)
    memory = torch.cat([states.expand(4, -1, -1), model.t5.encode(ids, mask, encoder_peft)], dim=1)
    memory_mask = torch.cat([torch.ones(4, 9, dtype=torch.long), mask], dim=1)
    recomputed = model.t5.decode(decoder_ids, memory, memory_mask, decoder_peft)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["hint", "lora_only", "hint_no_fusion"])
@torch.no_grad()
def test_mixed_task_batch_equals_each_task_alone(variant):
    model = tiny(variant)
    tasks = [model.generate_modules(torch.randint(2, VOCAB, (1, n))) for n in (3, 8, 5)]
    stacked = TaskModules.stack(tasks)
    assert stacked.num_tasks == 3
    ids, mask = inputs(rows=6)
    task_index = torch.tensor([2, 0, 1, 0, 2, 1])
    decoder_ids = torch.randint(2, VOCAB, (6, 4))
    mixed_logits = model(ids, mask, decoder_input_ids=decoder_ids, modules=stacked, task_index=task_index).logits
    mixed_tokens = model.generate(ids, mask, modules=stacked, task_index=task_index, max_new_tokens=6)
    for row, t in enumerate(task_index.tolist()):
        alone = model(ids[row:row + 1], mask[row:row + 1], decoder_input_ids=decoder_ids[row:row + 1],
                      modules=tasks[t]).logits
        torch.testing.assert_close(mixed_logits[row:row + 1], alone, atol=1e-5, rtol=1e-5)
        tokens = model.generate(ids[row:row + 1], mask[row:row + 1], modules=tasks[t], max_new_tokens=6)[0]
        assert mixed_tokens[row, :len(tokens)].tolist() == tokens.tolist()
    with pytest.raises(ValueError, match="task_index"):
        model.generate(ids, mask, modules=stacked, max_new_tokens=2)


def test_task_state_round_trips_and_counts_its_bytes(tmp_path):
    model = tiny()
    modules = model.generate_modules(torch.randint(2, VOCAB, (1, 7)))
    modules.save(tmp_path / "task.safetensors")
    loaded = TaskModules.load(tmp_path / "task.safetensors")
    assert loaded.nbytes == modules.nbytes == sum(
        t.numel() * 4 for t in (*modules.peft.values(), modules.instruction_key, modules.instruction_value)
    ) + modules.instruction_mask.numel() * modules.instruction_mask.element_size()


@torch.no_grad()
def test_generation_defaults_to_the_models_target_length():
    model = tiny(max_target_len=7, eos_token_id=VOCAB)  # an EOS it never emits: rows run to the limit
    ids, mask = inputs()
    modules = model.generate_modules(torch.randint(2, VOCAB, (1, 4)))
    assert model.generate(ids, mask, modules=modules).shape == (4, 7)
    assert model.generate(ids, mask, modules=modules, num_beams=3).shape == (4, 7)


@pytest.mark.parametrize("name", ["v1_1", "v1_0"])
def test_beam_search_matches_transformers(tmp_path, name):
    hf, directory = hf_t5(tmp_path, name)
    ours = HintModel.from_t5_checkpoint(directory, variant="no_instruct").eval()
    ids, mask, _ = batch()
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           num_beams=4, early_stopping=False, length_penalty=1.0, use_cache=False)
    got = ours.generate(ids, mask, max_new_tokens=10, num_beams=4)
    assert got.tolist() == expected[:, 1:1 + got.shape[1]].tolist()
    assert ours.generate(ids, mask, max_new_tokens=10, num_beams=1).tolist() == \
        ours.generate(ids, mask, max_new_tokens=10).tolist()
