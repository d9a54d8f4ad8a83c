"""HINT on decoder-only bases (issue 20): the hypernetwork reads the instruction with the base
itself (or an untied copy) and generates LoRA / adapters / prefixes per layer; with fusion the
instruction's own keys / values are the input's prefix. Bases are transformers' models built in
code (tests/hf_decoders.py)."""

import pytest
import torch
from hf_decoders import reference, right_padded

from hint_model import HintConfigError, HintModel, TaskModules

VARIANTS = ["hint", "hint_no_fusion", "lora_only"]


def base_model(tmp_path, family="llama", variant="hint", **overrides):
    reference(family, tmp_path)
    torch.manual_seed(0)
    return HintModel.from_hf_checkpoint(tmp_path, variant=variant, **overrides)


def mixed_batch(seed=2):
    """Four causal rows of three tasks: rows 0 and 2 share an instruction, row 3's is shorter;
    prompts right-padded; labels follow input_ids (pipelines.collate(causal=True))."""
    hyper, hyper_mask = right_padded([6, 5, 6, 3], seed=seed)
    hyper[2], hyper_mask[2] = hyper[0], hyper_mask[0]
    ids, mask = right_padded([5, 3, 4, 5], seed=seed + 1)
    labels = torch.roll(ids, -1, dims=1).masked_fill(mask == 0, -100)
    labels[:, -1] = -100
    return dict(hyper_input_ids=hyper, hyper_attention_mask=hyper_mask, input_ids=ids,
                attention_mask=mask, labels=labels)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_task_batch_equals_each_example_alone(tmp_path, family, variant):
    model = base_model(tmp_path, family, variant, lora=True, lora_targets=["q", "k", "v", "o"]).eval()
    b = mixed_batch()
    with torch.no_grad():
        together = model(**b).logits
        for i in range(4):
            hyper_len, length = int(b["hyper_attention_mask"][i].sum()), int(b["attention_mask"][i].sum())
            alone = model(hyper_input_ids=b["hyper_input_ids"][i:i + 1, :hyper_len],
                          input_ids=b["input_ids"][i:i + 1, :length]).logits
            torch.testing.assert_close(together[i:i + 1, :length], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_modules_change_the_logits(tmp_path, variant):
    model = base_model(tmp_path, variant=variant).eval()
    b = mixed_batch()
    modules = model.generate_modules(b["hyper_input_ids"][:1, :6])
    other = model.generate_modules(b["hyper_input_ids"][1:2, :5])
    inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    real = b["attention_mask"].bool()
    with torch.no_grad():
        task = model(**inputs, modules=modules).logits[real]
        plain = model(**inputs, modules=TaskModules()).logits[real]
        assert (task - plain).abs().max() > 1e-3
        assert (task - model(**inputs, modules=other).logits[real]).abs().max() > 1e-3


def test_all_zero_modules_with_fusion_are_the_concatenation(tmp_path):
    # No generated effect (LoRA and adapters of zeros) leaves fusion: the instruction's own
    # keys / values as the prefix, which is the base reading instruction + input.
    model = base_model(tmp_path, variant="hint", prefixes=False, lora=True).eval()
    for mlp in model.generator.mlps.values():
        torch.nn.init.zeros_(mlp.fc2.weight)
    instruction, _ = right_padded([6], seed=7)
    ids, _ = right_padded([5], seed=8)
    with torch.no_grad():
        fused = model(hyper_input_ids=instruction, input_ids=ids).logits
        concat = model(input_ids=torch.cat([instruction, ids], dim=1), modules=TaskModules()).logits
    torch.testing.assert_close(fused, concat[:, 6:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["hint", "lora_only"])
def test_cached_modules_round_trip_and_serve_generate_and_score(tmp_path, variant):
    model = base_model(tmp_path, variant=variant).eval()
    b = mixed_batch()
    instruction = b["hyper_input_ids"][:1, :6]
    modules = model.generate_modules(instruction)
    modules.save(tmp_path / "task.safetensors")
    loaded = TaskModules.load(tmp_path / "task.safetensors")
    ids, mask = b["input_ids"], b["attention_mask"]
    hyper = dict(hyper_input_ids=instruction.expand(4, -1))
    uncached = model.generate(ids, mask, max_new_tokens=5, **hyper)
    assert torch.equal(model.generate(ids, mask, modules=loaded, max_new_tokens=5), uncached)
    assert torch.equal(model.generate(ids, mask, modules=loaded, max_new_tokens=5, num_beams=2),
                       model.generate(ids, mask, max_new_tokens=5, num_beams=2, **hyper))
    targets = torch.randint(3, 90, (4, 3))
    targets[1, 2] = -100
    with torch.no_grad():
        torch.testing.assert_close(model.score(ids, mask, targets, modules=loaded),
                                   model.score(ids, mask, targets, **hyper))


def test_gradients_reach_the_generator_and_the_tied_base(tmp_path):
    model = base_model(tmp_path)
    model(**mixed_batch()).loss.backward()
    for name in ("generator.embeddings.lora_q_a", "generator.cross_attn.k.weight",
                 "generator.mlps.prefix_key.fc1.weight", "generator.mlps.adapter_up.fc2.weight",
                 "base.tokens.weight", "base.blocks.0.attn.q.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("tied", [True, False])
def test_freeze_underlying_trains_the_hypernetwork_only(tmp_path, tied):
    model = base_model(tmp_path, variant="lora_only", freeze_underlying=True, tied_hyper_encoder=tied)
    assert not any(p.requires_grad for p in model.base.parameters())
    model(**mixed_batch()).loss.backward()
    assert all(p.grad is None for p in model.base.parameters())
    assert model.generator.mlps["lora_v_b"].fc2.weight.grad.abs().sum() > 0
    if not tied:  # the untied hyper-encoder is part of the hypernetwork: it trains
        assert model.hyper_encoder.blocks[0].attn.q.weight.grad.abs().sum() > 0
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"generator"} if tied else {"generator", "hyper_encoder"})


def test_untied_hyper_encoder_starts_as_the_base_and_is_its_own(tmp_path):
    tied = base_model(tmp_path, variant="lora_only").eval()
    untied = base_model(tmp_path, variant="lora_only", tied_hyper_encoder=False).eval()
    assert untied.hyper_encoder.blocks[0].attn.q.weight is not untied.base.blocks[0].attn.q.weight
    assert len(untied.blocks()) == 2 * len(tied.blocks())
    untied.generator.load_state_dict(tied.generator.state_dict())
    instruction = mixed_batch()["hyper_input_ids"][:1]
    with torch.no_grad():  # the same weights: the same modules, until training moves them apart
        for kind, t in tied.generate_modules(instruction).peft.items():
            torch.testing.assert_close(untied.generate_modules(instruction).peft[kind], t)


@pytest.mark.parametrize("variant", ["hint", "lora_only", "concat", "no_instruct"])
def test_every_variant_trains_on_a_fixed_batch(tmp_path, variant):
    model = base_model(tmp_path, "gpt2", variant)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(**mixed_batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_hypernetwork_configs_are_clear_errors(tmp_path):
    reference("opt-proj", tmp_path)
    with pytest.raises(HintConfigError, match="word_embed_proj_dim=32.*generator reads d_model"):
        HintModel.from_hf_checkpoint(tmp_path, variant="hint")
    model = base_model(tmp_path / "llama", max_hyper_len=5)
    with pytest.raises(ValueError, match="instruction of example 0 has 6 tokens, more than "
                                         "HintConfig.max_hyper_len=5"):
        model(**mixed_batch())
