"""The Appendix C compute / memory model against values worked out by hand."""

from hint_model import VARIANT_PRESETS, HintConfig
from hint_model.flops import (component_layout, generator_flops, generator_query_flops, gflops_per_task,
                              input_flops, instruction_flops, stack_weights, task_cost)
from hint_platform.training.worker import training_flops

# d=4, 2 heads of 2 (inner 4), gated FFN 8 wide, one encoder and one decoder layer, vocab 10,
# adapters of 2, prefixes of 1, fusion on, component generator.
CFG = HintConfig.from_dict(dict(
    vocab_size=10, d_model=4, d_kv=2, num_heads=2, d_ff=8, num_layers=1, num_decoder_layers=1,
    adapter_size=2, prefix_length=1, lora=False, generator="component"))


def test_stack_weights():
    # encoder: 4*d*inner = 64 attention + 3*d*d_ff = 96 FFN
    # memory: the cross-attention's k and v, 2*d*inner = 32 per memory token
    # decoder: 6*d*inner = 96 (self q k v o, cross q o) + 96 FFN + d*vocab = 40 lm head
    assert stack_weights(CFG) == (160, 32, 232)


def test_hand_computed_task_cost():
    cost = task_cost(CFG, n=3, t=5, i=2, o=1)
    # concat: 2*(160+32)*3*(5+2) + 2*232*3*1
    assert cost.concat == 8064 + 1392
    # generator: 18 rows (adapter 4+4+2+2, prefix 3+3);
    #   mixing 4*d*d*t + 4*d*d*rows + 4*rows*t*d = 320 + 1152 + 1440;
    #   MLPs 16 rows of width 4 at 2*(16+16), 2 rows of width 2 at 2*(16+8) = 1024 + 96
    assert cost.generator == 2912 + 1120
    # fusion: the instruction's cross-attention K/V once per task, 4*d*inner*t = 320
    assert cost.fusion_kv == 320
    # per input: 2*(160+32)*2 + 2*232*1 + adapters 4*d*a*(2+1)=96 + prefixes 4*P*inner*(2+2)=64
    #   + attention over the t fused keys 4*t*inner*o = 80
    per_input = 768 + 464 + 96 + 64 + 80
    assert cost.hint == 2 * 160 * 5 + 4032 + 320 + 3 * per_input
    # state: adapters 16+4+16+8, prefixes 2*3*1*4, the instruction's cross-attention keys and
    # values 2 * 1 layer * inner * t = 40 values, 2 bytes each
    assert cost.hint_state_bytes == (44 + 24 + 40) * 2
    # decoder-only cache of the instruction: 2 * (1+1) layers * 4 * 5 values, 2 bytes each
    assert cost.kv_cache_bytes == 80 * 2


def test_variants_change_only_their_terms():
    no_fusion = task_cost(HintConfig.from_dict({**CFG.to_dict(), "fusion": False}), 3, 5, 2, 1)
    assert no_fusion.hint == task_cost(CFG, 3, 5, 2, 1).hint - 320 - 3 * 80
    concat = task_cost(HintConfig.preset("tiny", variant="concat"), 3, 5, 2, 1)
    assert concat.generator == 0 and concat.hint_state_bytes == 0


def test_hint_pays_off_for_long_instructions_at_3b():
    xl = HintConfig.preset("xl", variant="hint")
    few, many = task_cost(xl, n=1, t=1024, i=256, o=16), task_cost(xl, n=100, t=1024, i=256, o=16)
    print(f"xl, t=1024 i=256 o=16: speedup n=1 {few.speedup:.2f}, n=100 {many.speedup:.2f}; "
          f"state {many.hint_state_bytes / 2**20:.0f} MiB vs KV cache {many.kv_cache_bytes / 2**20:.0f} MiB")
    assert few.speedup < 1 < 2 < many.speedup  # the generator costs; reuse pays it back
    # The fused instruction is kept as the decoder layers' cross-attention keys / values (no
    # per-input recompute): half the cache of a decoder-only model of the same depth, plus the
    # generated modules.
    fused = 2 * 24 * 2048 * 1024 * 2
    assert fused == many.kv_cache_bytes // 2 < many.hint_state_bytes < 1.1 * many.kv_cache_bytes


def test_fusion_keys_and_values_are_paid_once_per_task():
    """Ten times the inputs: ten times the per-input attention over the instruction, the
    instruction's K/V projections once (2 layers x 2 (K, V) x 2 FLOPs x d x inner x t)."""
    cfg = HintConfig.preset("xl", variant="hint")
    no_fusion = HintConfig.preset("xl", variant="hint_no_fusion")
    t, i, o = 1024, 256, 16
    extra = {n: task_cost(cfg, n, t, i, o).hint - task_cost(no_fusion, n, t, i, o).hint for n in (1, 10)}
    kv = 24 * 2 * 2 * 2048 * 2048 * t
    attention = 24 * 2 * 2 * t * 2048 * o
    assert extra[1] == kv + attention and extra[10] == kv + 10 * attention
    assert gflops_per_task(cfg, n=10, i=i, t=t, target_len=o) == task_cost(cfg, 10, t, i, o).hint / 1e9


def test_gflops_per_task_of_the_baselines():
    """Concatenation reads t + i tokens per input, static PEFT adds its modules' cost on those,
    No-Instruct reads i only (hand values on CFG's shapes: N_enc + N_mem 192, N_dec 232)."""
    shapes = {k: v for k, v in CFG.to_dict().items()
              if k not in ("hypernetwork", "fusion", "adapters", "prefixes", "lora", "variant")}
    concat = HintConfig.from_dict({**shapes, **VARIANT_PRESETS["concat"], "variant": "concat"})
    assert gflops_per_task(concat, n=3, i=2, t=5, target_len=1) * 1e9 == 3 * (2 * 192 * 7 + 2 * 232)
    none = HintConfig.from_dict({**shapes, **VARIANT_PRESETS["no_instruct"], "variant": "no_instruct"})
    assert gflops_per_task(none, n=3, i=2, t=5, target_len=1) * 1e9 == 3 * (2 * 192 * 2 + 2 * 232)
    static = HintConfig.from_dict({**shapes, **VARIANT_PRESETS["static_peft"], "variant": "static_peft"})
    # adapters 4*d*a*(7+1) = 256, prefixes 4*P*inner*(7+2) = 144 per input
    assert gflops_per_task(static, n=3, i=2, t=5, target_len=1) * 1e9 == 3 * (2 * 192 * 7 + 2 * 232 + 256 + 144)


def test_decoder_generator_cost_is_linear_in_its_queries():
    """No self-attention among the slot queries: doubling the rows (adapter size) adds at most
    about twice the cost, never the square."""
    small = HintConfig.preset("xl", variant="generator_decoder")
    big = HintConfig.preset("xl", variant="generator_decoder", adapter_size=1024)
    assert generator_flops(big, 1024) < 2.1 * generator_flops(small, 1024)


def test_training_flops_count_each_instruction_once_per_micro_batch():
    # one task of one input: the HINT cost of test_hand_computed_task_cost with n=1
    assert instruction_flops(CFG.to_dict(), 5) + input_flops(CFG, 5, 2, 1) == 1600 + 4032 + 320 + 1472
    concat = HintConfig.from_dict({**CFG.to_dict(), "hypernetwork": False, "fusion": False,
                                   "adapters": False, "prefixes": False})
    assert instruction_flops(concat, 5) + input_flops(concat, 0, 2, 1) == 2 * 192 * 2 + 2 * 232
    row = {"hyper_input_ids": [7] * 5, "input_ids": [3, 1], "labels": [1]}
    other = {**row, "hyper_input_ids": [8] * 5}
    # two rows of one task share its instruction's 1600 + ...; the same rows in two micro-batches don't
    one_task = 3 * (instruction_flops(CFG, 5) + 2 * input_flops(CFG, 5, 2, 1))
    assert training_flops(CFG, [[row, row]]) == one_task
    # two tasks in one micro-batch: the generator projects its slot queries once, 2*d*d*18 rows
    assert generator_query_flops(CFG) == 576
    assert training_flops(CFG, [[row], [row]]) == training_flops(CFG, [[row, other]]) + 3 * 576
    assert training_flops(CFG, [[row, other]]) > one_task


def test_generator_flops_follow_the_mlp_width():
    """Only the MLPs depend on generator_mlp_dim: doubling it adds rows x 2 x (d*h + h*width)."""
    base = HintConfig.preset("tiny", variant="hint")
    wide = HintConfig.preset("tiny", variant="hint", generator_mlp_dim=2 * base.d_model)
    d, h = base.d_model, base.d_model
    extra = sum(slots * count * 2 * (d * h + h * width) for slots, count, width in component_layout(base).values())
    assert generator_flops(wide, 10) - generator_flops(base, 10) == extra
