"""FLOPs, cache memory and sizes of decoder-only models, against figures computed by hand."""

import pytest
import torch

from hint_model import HintConfig, HintModel, peft
from hint_model.flops import (decoder_weights, gflops_per_task, kv_cache_values, peft_flops,
                              task_cost, task_state_values)
from hint_model.memory import activation_values, meta_model, parameter_counts, training_memory
from tests.autograd_memory import saved_values


def test_decoder_only_flops_by_hand():
    # llama-tiny: d 64, 4 heads of 16 (inner 64), 2 kv heads (kv_inner 32), SwiGLU 128, 2 layers
    cfg = HintConfig.preset("llama-tiny", variant="concat", vocab_size=100)
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert decoder_weights(cfg) == (2 * layer, 64 * 100) == (73728, 6400)
    cost = task_cost(cfg, n=10, t=5, i=3, o=2)
    assert cost.concat == 2 * 80128 * 10 * (5 + 3 + 2) == 16_025_600
    assert cost.cached_concat == 2 * 73728 * 5 + 2 * 80128 * 10 * (3 + 2) == 8_750_080
    assert cost.hint == cost.cached_concat  # this model's own way: the cached instruction
    assert cost.kv_cache_bytes == 2 * (2 * 2 * 32 * 5)  # 2 L kv_inner t values, bf16
    assert task_state_values(cfg, 5) == kv_cache_values(cfg, 5) == 640
    assert gflops_per_task(cfg, n=10, i=3, t=5, target_len=2) == 8_750_080 / 1e9
    assert gflops_per_task(cfg, n=10, i=3, t=5, target_len=2, cached_instruction=False) == 16_025_600 / 1e9
    no_instruct = HintConfig.preset("llama-tiny", variant="no_instruct", vocab_size=100)
    assert gflops_per_task(no_instruct, n=10, i=3, t=5, target_len=2) == 10 * 2 * 80128 * 5 / 1e9
    assert task_state_values(no_instruct, 5) == 0


def test_opt_projections_and_peft_by_hand():
    opt = HintConfig.preset("opt-13b", variant="concat", d_model=64, d_kv=16, num_heads=4, d_ff=96,
                            num_layers=2, vocab_size=100, word_embed_proj_dim=32)
    assert decoder_weights(opt) == (2 * (4 * 64 * 64 + 2 * 64 * 96) + 2 * 32 * 64, 32 * 100)
    cfg = HintConfig.preset("llama-tiny", variant="static_peft", vocab_size=100, lora=True,
                            lora_targets=["q", "k", "v", "o"])  # adapters 8, prefixes 4, rank 4
    tokens = 2 * (3 + 2)  # layers x (input + output) tokens
    adapters, prefixes = 4 * 64 * 8 * tokens, 4 * 4 * 64 * tokens
    lora = 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64)) * tokens
    assert peft_flops(cfg, 3, 2) == adapters + prefixes + lora == 20480 + 10240 + 35840


def test_decoder_hint_flops_and_task_state_by_hand():
    # lora_only on llama-tiny (rank 4 on q, v; one slot per layer): the base reads the
    # instruction once (no head), the component generator writes 2 layers x 4 components of
    # q_a, q_b, v_a (64 wide) and v_b (kv_inner 32 wide); every input pays its LoRA.
    cfg = HintConfig.preset("llama-tiny", variant="lora_only", vocab_size=100)
    t, rows = 5, 2 * 4 * 4
    mlps = 2 * 4 * 2 * (64 * 64 + 64 * 64) * 3 + 2 * 4 * 2 * (64 * 64 + 64 * 32)
    mixing = 2 * 2 * 64 * 64 * t + 2 * 2 * 64 * 64 * rows + 2 * 2 * rows * t * 64
    cost = task_cost(cfg, n=10, t=t, i=3, o=2)
    assert cost.generator == mixing + mlps
    lora = 2 * 4 * ((64 + 64) + (64 + 32)) * 2 * (3 + 2)
    assert cost.hint == 2 * 73728 * t + mixing + mlps + 10 * (2 * 80128 * (3 + 2) + lora)
    # task state: the generated LoRA, 2 layers x (q: 64x4 + 4x64, v: 64x4 + 4x32) values,
    # against the cached keys / values of the instruction, 2 L kv_inner t
    assert task_state_values(cfg, t) == 2 * (512 + 384) == 1792
    assert kv_cache_values(cfg, t) == 640
    hint = HintConfig.preset("llama-tiny", variant="hint", vocab_size=100)  # + adapters, prefixes, fusion
    assert hint.lora and task_state_values(hint, t) == sum(
        torch.Size(s).numel() for s in peft.shapes(hint).values()) + kv_cache_values(hint, t)


def test_paper_sizes_on_the_meta_device():
    """gpt2-xl, opt-13b and llama-3b have the parameters of their Hugging Face checkpoints."""
    for size, expected in (("gpt2-xl", 1_557_611_200), ("opt-13b", 12_853_473_280),
                           ("llama-3b", 3_212_749_824)):  # meta-llama/Llama-3.2-3B
        cfg = HintConfig.preset(size, variant="concat")
        model = meta_model(cfg)
        counts = parameter_counts(cfg, model)
        assert counts.total == counts.underlying == expected
        assert len(model.blocks()) == cfg.num_layers
        mem = training_memory(cfg, workers=8, micro_batch=4, hyper_len=512, input_len=512,
                              target_len=256, model=model)
        assert mem.weights == 4 * expected / 8 and 0 < mem.activations < 100 * 2 ** 30
    xl = HintConfig.preset("gpt2-xl", variant="concat")
    # 2N per token: 48 layers of 4 d^2 + 2 d 4d, and the head
    assert sum(decoder_weights(xl)) == 48 * (4 * 1600 ** 2 + 2 * 1600 * 6400) + 1600 * 50257


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-xl"])
def test_activation_checkpointing_gives_the_same_gradients(preset):
    small = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, vocab_size=50)
    cfg = HintConfig.preset(preset, variant="concat", **small)
    torch.manual_seed(0)
    model = HintModel(cfg).train()
    ids = torch.randint(3, 50, (2, 6))
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.set_activation_checkpointing(on)
        model(input_ids=ids, labels=ids, hyper_input_ids=ids[:, :3]).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert model.base.checkpointing


@pytest.mark.parametrize("variant", ["concat", "no_instruct"])
def test_activation_estimate_against_what_autograd_saves(variant):
    """memory.activation_values for a decoder-only model (the instruction's pass included for
    concat) against the bytes autograd saves on CPU, parameters left out: within 30%."""
    torch.manual_seed(0)
    cfg = HintConfig.preset("llama-small", variant=variant, vocab_size=1000, num_layers=2)
    model = HintModel(cfg)
    batch, hyper, inputs, target = 2, 96, 96, 24
    ids = torch.randint(2, 1000, (batch, inputs + target))
    measured = saved_values(model, input_ids=ids, labels=ids,
                            hyper_input_ids=torch.randint(2, 1000, (batch, hyper)))
    estimate = activation_values(cfg, batch, hyper, inputs, target, checkpointing=False)
    assert 0.7 < estimate / measured < 1.3
