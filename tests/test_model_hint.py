"""The hypernetwork side: presets, generation per unique instruction, gradients, training."""

import pytest
import torch

from hint_model import VARIANT_PRESETS, HintConfig, HintConfigError, HintModel, TaskModules

VOCAB = 100


def tiny(variant="hint", **overrides):
    torch.manual_seed(0)
    return HintModel(HintConfig.preset("tiny", variant=variant, vocab_size=VOCAB, **overrides))


def mixed_batch():
    """Four examples, three tasks: rows 0 and 2 share an instruction; row 3's is shorter."""
    torch.manual_seed(2)
    hyper = torch.randint(2, VOCAB, (4, 6))
    hyper[2] = hyper[0]
    hyper_mask = torch.ones_like(hyper)
    hyper[3, 4:], hyper_mask[3, 4:] = 0, 0
    ids = torch.randint(2, VOCAB, (4, 5))
    mask = torch.ones_like(ids)
    ids[1, 3:], mask[1, 3:] = 0, 0
    labels = torch.randint(2, VOCAB, (4, 3))
    labels[1, 2] = -100
    return dict(hyper_input_ids=hyper, hyper_attention_mask=hyper_mask, input_ids=ids,
                attention_mask=mask, labels=labels)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(HintConfigError, match="valid: tiny, small, base, large, xl, xxl"):
        HintConfig.preset("huge")
    with pytest.raises(HintConfigError, match="hint_no_fusion"):
        HintConfig.preset("tiny", variant="hint_fusion")
    with pytest.raises(HintConfigError, match="unknown HintConfig field 'adapter'"):
        HintConfig.preset("tiny", adapter=3)
    with pytest.raises(HintConfigError, match="HintConfig.adapter_size: expected int"):
        HintConfig.preset("tiny", adapter_size="8")


@pytest.mark.parametrize("overrides, message", [
    (dict(generator_heads=3), "HintConfig.generator_heads=3 must divide d_model=64"),
    (dict(generator_heads=0), "HintConfig.generator_heads: must be positive, got 0"),
    (dict(generator_mlp_dim=-8), "HintConfig.generator_mlp_dim: must be positive, got -8"),
    (dict(generator_mlp_dim=True), "HintConfig.generator_mlp_dim: expected int | None, got True"),
    (dict(generator="decoder", generator_heads=4),
     "HintConfig.generator_heads: only the component generator has its own heads"),
])
def test_bad_generator_shape_is_a_clear_error(overrides, message):
    with pytest.raises(HintConfigError, match=message):
        HintConfig.preset("tiny", **overrides)


def test_config_round_trips_through_a_dict():
    cfg = HintConfig.preset("small", variant="lora_only", vocab_size=1000)
    assert HintConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.lora and not cfg.adapters and cfg.vocab_size == 1000


@pytest.mark.parametrize("variant", ["adapters_only", "lora_only"])
def test_all_zero_modules_give_the_plain_t5(variant):
    model = tiny(variant, fusion=False).eval()
    for mlp in model.generator.mlps.values():
        torch.nn.init.zeros_(mlp.fc2.weight)
    b = mixed_batch()
    with torch.no_grad():
        hint = model(**b).logits
        plain = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      labels=b["labels"], modules=TaskModules()).logits
    assert torch.equal(hint, plain)


@pytest.mark.parametrize("variant, overrides", [
    ("hint", {}), ("lora_only", {}), ("generator_decoder", {}), ("hypter", {}),
    ("lora_only", dict(lora_targets=["k", "o"])),
])
def test_mixed_task_batch_equals_each_example_alone(variant, overrides):
    model = tiny(variant, **overrides).eval()
    b = mixed_batch()
    with torch.no_grad():
        together = model(**b).logits
        for i in range(4):
            hyper_len = int(b["hyper_attention_mask"][i].sum())
            alone = model(hyper_input_ids=b["hyper_input_ids"][i:i + 1, :hyper_len],
                          hyper_attention_mask=b["hyper_attention_mask"][i:i + 1, :hyper_len],
                          input_ids=b["input_ids"][i:i + 1], attention_mask=b["attention_mask"][i:i + 1],
                          labels=b["labels"][i:i + 1]).logits
            torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora_only", "hint"])
def test_every_lora_target_is_generated_and_applied(variant):
    # q, k, v, o on every attention (with fusion, k and v also on the fused instruction's keys
    # and values): each target's modules change the logits, and per example as alone.
    model = tiny(variant, lora=True, lora_targets=["q", "k", "v", "o"]).eval()
    assert set(model.generator.layout) >= {f"lora_{t}_{m}" for t in "qkvo" for m in "ab"}
    assert model.generator.layout["lora_o_a"] == (6, 4, 64)  # 6 slots, rank 4, input inner = 64
    b = mixed_batch()
    modules = model.generate_modules(b["hyper_input_ids"][:1], b["hyper_attention_mask"][:1])
    inputs = dict(input_ids=b["input_ids"][:1], attention_mask=b["attention_mask"][:1],
                  labels=b["labels"][:1])
    with torch.no_grad():
        full = model(**inputs, modules=modules).logits
        for target in "qkvo":
            without = TaskModules({k: v for k, v in modules.peft.items() if f"_{target}_" not in k},
                                  modules.instruction_key, modules.instruction_value,
                                  modules.instruction_mask)
            assert not torch.allclose(model(**inputs, modules=without).logits, full), target


def test_lora_targets_are_checked():
    with pytest.raises(HintConfigError, match=r"lora_targets=\['q', 'x'\]: a non-empty list of distinct names from q, k, v, o"):
        HintConfig.preset("tiny", lora_targets=["q", "x"])
    with pytest.raises(HintConfigError, match="HintConfig.lora_targets: expected a list of strings"):
        HintConfig.preset("tiny", lora_targets="qv")


def test_generator_runs_once_per_unique_instruction():
    model = tiny()
    calls, queries = [], []
    model.generator.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    model.generator.cross_attn.q.register_forward_hook(lambda mod, args, out: queries.append(args[0].shape[0]))
    model(**mixed_batch())
    assert calls == [3]  # one call, three unique instructions for four examples
    assert queries == [1]  # the slot queries are the same for every task: projected once


def grouped(b: dict) -> dict:
    """mixed_batch as pipelines.collate batches it: one instruction row per task (0, 1, 3)
    and each example's row as task_index."""
    rows = torch.tensor([0, 1, 3])
    return {**b, "hyper_input_ids": b["hyper_input_ids"][rows],
            "hyper_attention_mask": b["hyper_attention_mask"][rows],
            "task_index": torch.tensor([0, 1, 0, 2])}


@pytest.mark.parametrize("variant", ["hint", "hypter"])
def test_instructions_grouped_by_the_caller_give_the_same_logits(variant):
    model = tiny(variant).eval()
    calls = []
    model.generator.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        each = model(**mixed_batch()).logits
        by_task = model(**grouped(mixed_batch())).logits
    torch.testing.assert_close(by_task, each, rtol=1e-5, atol=1e-5)
    assert calls == [3, 3]


def test_grouped_instructions_are_checked_by_shape():
    b = grouped(mixed_batch())
    with pytest.raises(ValueError, match=r"task_index must hold one task row per example, \[4\]"):
        tiny()(**{**b, "task_index": torch.tensor([0, 1, 0])})
    with pytest.raises(ValueError, match="padded to 6 tokens, more than HintConfig.max_hyper_len=5"):
        tiny(max_hyper_len=5)(**b)


def test_gradients_reach_generator_embeddings_and_tied_encoder():
    model = tiny()
    model(**mixed_batch()).loss.backward()
    for name in ("generator.embeddings.prefix_key", "generator.cross_attn.k.weight",
                 "generator.mlps.adapter_up.fc1.weight", "t5.shared.weight",
                 "t5.encoder.blocks.0.attn.q.weight", "t5.decoder.blocks.1.cross_attn.v.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_tied_encoder_learns_through_the_generator():
    # The generated modules alone (no input side): their gradient reaches the T5 encoder
    # because the hyper-encoder is that encoder.
    model = tiny("hint_no_fusion")
    b = mixed_batch()
    modules = model.generate_modules(b["hyper_input_ids"][:1], b["hyper_attention_mask"][:1])
    sum(t.sum() for t in modules.peft.values()).backward()
    assert model.t5.encoder.blocks[0].ffn.wo.weight.grad.abs().sum() > 0
    assert model.t5.decoder.blocks[0].ffn.wo.weight.grad is None


def test_untied_encoder_gets_its_own_gradients():
    model = tiny("untied_encoder")
    model(**mixed_batch()).loss.backward()
    assert model.hyper_encoder.blocks[0].attn.q.weight.grad.abs().sum() > 0
    assert model.hyper_encoder.blocks[0].attn.q.weight is not model.t5.encoder.blocks[0].attn.q.weight


@pytest.mark.parametrize("variant", list(VARIANT_PRESETS))
def test_every_preset_trains_on_a_fixed_batch(variant):
    model = tiny(variant)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = mixed_batch()
    losses = []
    for _ in range(4):
        loss = model(**b).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def generator_size(model):
    return sum(p.numel() for p in model.generator.parameters())


# tiny: d=64, 4 layers, 6 attention slots, adapters of 8, prefixes of 4. Component generator:
# rows (slot x component) adapter down/up 4*8 each, their biases 4 each, prefix key/value 6*4 each
# = 120; six MLPs d -> h -> width, widths 64+64+8+64+64+64 = 328; cross-attention 4*d*d at any
# number of heads. Pooled (Hypter): four MLPs d -> h -> that kind for all 4 layers, whose widths
# sum to 4 whole adapters (4 * (64*8 + 8 + 8*64 + 64) = 4 * 1096).
COMPONENT_MLPS = 6 * 64 + 328
POOLED_MLPS = 4 * 64 + 4 * 1096


def test_default_generator_sizes_are_the_papers():
    assert generator_size(tiny()) == 120 * 64 + 4 * 64 * 64 + 64 * COMPONENT_MLPS  # h = d
    assert generator_size(tiny("hypter")) == 64 * POOLED_MLPS  # h = d (hyper_network.py)


@pytest.mark.parametrize("variant, overrides, hand_change", [
    ("hint", dict(generator_mlp_dim=32, generator_heads=2), (32 - 64) * COMPONENT_MLPS),
    ("generator_decoder", dict(generator_mlp_dim=128), (128 - 64) * COMPONENT_MLPS),
    ("hypter", dict(generator_mlp_dim=16), (16 - 64) * POOLED_MLPS),
])
def test_generator_shape_sets_its_size_and_trains(variant, overrides, hand_change):
    model = tiny(variant, **overrides)
    assert generator_size(model) - generator_size(tiny(variant)) == hand_change
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**mixed_batch()).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(model(**mixed_batch()).loss)


def test_generator_heads_change_the_attention():
    default, two_heads = tiny().eval(), tiny(generator_heads=2).eval()
    assert (default.generator.cross_attn.num_heads, two_heads.generator.cross_attn.num_heads) == (4, 2)
    two_heads.load_state_dict(default.state_dict())  # same weights, split into other heads
    with torch.no_grad():
        assert not torch.allclose(default(**mixed_batch()).logits, two_heads(**mixed_batch()).logits)


def test_frozen_underlying_trains_the_generator_only():
    model = tiny("frozen_underlying")
    assert not any(p.requires_grad for p in model.t5.parameters())
    model(**mixed_batch()).loss.backward()
    assert model.generator.mlps["prefix_key"].fc2.weight.grad.abs().sum() > 0


def test_baselines_ignore_the_instruction():
    model = tiny("no_instruct").eval()
    b = mixed_batch()
    with torch.no_grad():
        with_hyper = model(**b).logits
        without = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        labels=b["labels"]).logits
    assert torch.equal(with_hyper, without)


def test_bad_instructions_are_clear_errors():
    model = tiny(max_hyper_len=5)
    with pytest.raises(ValueError, match="instruction of example 0 has 6 tokens, more than HintConfig.max_hyper_len=5"):
        model(**mixed_batch())
    empty = mixed_batch()
    empty["hyper_attention_mask"][1] = 0
    with pytest.raises(ValueError, match="instruction of example 1 is empty"):
        tiny()(**empty)
    with pytest.raises(ValueError, match="needs hyper_input_ids"):
        b = mixed_batch()
        model(input_ids=b["input_ids"], labels=b["labels"])


def test_activation_checkpointing_gives_the_same_gradients():
    b = mixed_batch()
    grads = []
    for on in (False, True):
        model = tiny()
        model.set_activation_checkpointing(on)
        model(**b).loss.backward()
        grads.append(model.generator.embeddings["adapter_down"].grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_blocks_lists_every_t5_block():
    model = tiny("generator_decoder", tied_hyper_encoder=False)
    cfg = model.config
    assert len(model.blocks()) == 2 * cfg.num_layers + cfg.num_decoder_layers + cfg.generator_depth


@pytest.mark.parametrize("size, billions", [("xl", 2.85), ("xxl", 11.3)])
def test_paper_sizes_on_the_meta_device(size, billions):
    with torch.device("meta"):
        model = HintModel(HintConfig.preset(size, variant="hint"))
    t5 = sum(p.numel() for p in model.t5.parameters())
    generator = sum(p.numel() for p in model.generator.parameters())
    print(f"{size}: T5 {t5 / 1e9:.3f}B, generator {generator / 1e6:.1f}M")
    assert abs(t5 / 1e9 - billions) / billions < 0.02


@pytest.mark.parametrize("variant", ["hint", "lora_only"])
def test_cached_decoding_matches_recomputing_the_whole_prefix(variant):
    # The decoding cache holds real tokens only; prefixes join at attention time. Greedy
    # decoding with the cache must pick what a full forward over the tokens so far picks.
    model = tiny(variant).eval()
    b = mixed_batch()
    hyper = dict(hyper_input_ids=b["hyper_input_ids"], hyper_attention_mask=b["hyper_attention_mask"])
    tokens = model.generate(b["input_ids"], b["attention_mask"], max_new_tokens=6, **hyper)
    with torch.no_grad():
        logits = model(b["input_ids"], b["attention_mask"], decoder_input_ids=model.shift_right(tokens),
                       **hyper).logits
    eos = (tokens == model.config.eos_token_id).long()
    live = torch.cumsum(eos, dim=1) - eos == 0  # up to and including the first EOS
    assert torch.equal(logits.argmax(-1)[live], tokens[live])
