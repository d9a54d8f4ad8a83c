"""The compute and memory model of the paper's Appendix C, per task.

A task has n inputs of length i, an instruction of length t, and outputs of length o.
A token through a stack of N weights costs 2N FLOPs (multiply + add). Concatenation baselines
(T0 / Tk-Instruct) re-encode the instruction with every input; HINT encodes it once, runs the
generator once, and pays for its PEFT modules and the fused instruction per input:

  concat = 2 (N_enc + N_mem) n (t + i) + 2 N_dec n o
  hint   = 2 N_enc t + generator(t) + fusion_kv(t)
           + n (2 (N_enc + N_mem) i + 2 N_dec o + peft(i, o) + fusion(t, o))

With fusion the decoder's cross-attention keys/values of the instruction depend on the task
alone: fusion_kv(t) is paid once per task; per input only the attention over those t more keys
(fusion). Appendix C leaves the fusion cost out altogether; it is small, and counted here.
`gflops_per_task` is the one number per task for every variant (HINT and the baselines).

N_enc / N_dec count the matmul weights each input / output token goes through (attention + FFN;
the decoder's are its self-attention, the queries and outputs of its cross-attention, its FFN
and the lm head). N_mem counts the decoder's cross-attention keys / values, which project each
memory token once, not each output token. Norms, the position bias and the attention scores
are left out, as in the paper's 2N per token.
Memory: the state a task keeps between inputs (HINT: generated modules + encoded instruction)
against a decoder-only model's KV cache of the instruction, 2 L d t values.

Decoder-only models (cfg.is_decoder_only): 2N per token, N = the layers' matmul weights
(N_body: attention projections, FFN, OPT's embedding projections) + the lm head, and the
attention scores left out (Kaplan et al.'s convention, the paper's). Concatenation reads the
instruction with every input, 2N n (t + i + o); with the instruction's keys / values cached
once per task (the prefix every input attends to), 2 N_body t + 2N n (i + o); the cache holds
2 L kv_inner t values. HINT on a decoder-only base runs the base over the instruction once
(2 N_body t, its keys / values the fusion prefix for free) and the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hint_model import peft
from hint_model.config import HintConfig
from hint_model.generator import component_layout, slot_queries


@dataclass
class TaskCost:
    hint: float  # FLOPs
    concat: float
    # concatenation with the instruction's keys / values computed once per task: a
    # decoder-only model's cache (a T5's bidirectional encoder has none: = concat)
    cached_concat: float
    generator: float  # part of `hint`
    fusion_kv: float  # part of `hint`: the instruction's cross-attention K/V, once per task
    hint_state_bytes: int  # saved task state: generated modules (+ instruction with fusion)
    kv_cache_bytes: int  # a decoder-only model's cache of the instruction

    @property
    def speedup(self) -> float:
        return self.concat / self.hint


def stack_weights(cfg: HintConfig) -> tuple[int, int, int]:
    """(N_enc, N_mem, N_dec): matmul weights per input token through the encoder, per memory
    token through the decoder's cross-attention keys / values, per output token through the
    rest of the decoder."""
    d, inner = cfg.d_model, cfg.inner_dim
    ffn = (3 if cfg.is_gated else 2) * d * cfg.d_ff
    encoder = cfg.num_layers * (4 * d * inner + ffn)
    memory = cfg.num_decoder_layers * 2 * d * inner
    decoder = cfg.num_decoder_layers * (6 * d * inner + ffn) + d * cfg.vocab_size
    return encoder, memory, decoder


def decoder_weights(cfg: HintConfig) -> tuple[int, int]:
    """(N_body, N_head) of a decoder-only model: matmul weights per token through its layers
    (and OPT's embedding projections) and through the lm head."""
    d = cfg.d_model
    ffn = (3 if cfg.is_gated else 2) * d * cfg.d_ff
    width = cfg.word_embed_proj_dim or d
    projections = 2 * width * d if width != d else 0
    body = cfg.num_layers * (2 * d * cfg.inner_dim + 2 * d * cfg.kv_inner_dim + ffn) + projections
    return body, width * cfg.vocab_size


def generator_flops(cfg: HintConfig, t: int) -> int:
    """One generator run on an instruction of t tokens (0 without a hypernetwork)."""
    if not (cfg.hypernetwork and cfg.uses_peft):
        return 0
    d, inner, h = cfg.d_model, cfg.inner_dim, cfg.generator_hidden
    if cfg.generator == "pooled":  # one MLP per kind on the pooled instruction
        return sum(2 * (d * h + h * math.prod(shape)) for shape in peft.shapes(cfg).values())
    layout = component_layout(cfg)  # kind -> (slots, components per slot, output width)
    rows = sum(slots * count for slots, count, _ in layout.values())
    mlps = sum(slots * count * 2 * (d * h + h * width) for slots, count, width in layout.values())
    if cfg.generator == "component":
        # K/V of the instruction, Q/O of the rows, scores and weighted sum (Q: see
        # generator_query_flops).
        mixing = 2 * 2 * d * d * t + 2 * 2 * d * d * rows + 2 * 2 * rows * t * d
    else:  # decoder layers without self-attention: cross-attention to the instruction + FFN
        ffn = (3 if cfg.is_gated else 2) * d * cfg.d_ff
        mixing = cfg.generator_depth * (2 * (2 * d * inner + ffn) * rows + 2 * 2 * d * inner * t
                                        + 2 * 2 * rows * t * inner)
    return mixing + mlps


def generator_query_flops(cfg: HintConfig) -> int:
    """The part of generator_flops that one generator call pays once for all the tasks it
    generates: the component generator's projection of its slot queries, which are the same
    for every task (generator.CrossAttention)."""
    if not (cfg.hypernetwork and cfg.uses_peft) or cfg.generator != "component":
        return 0
    return 2 * cfg.d_model * cfg.d_model * slot_queries(cfg)


def peft_flops(cfg: HintConfig, i: int, o: int) -> int:
    """Extra FLOPs of the PEFT modules for one input of i tokens and o output tokens."""
    d, inner = cfg.d_model, cfg.inner_dim
    enc, dec = cfg.num_layers, cfg.num_decoder_layers
    if cfg.is_decoder_only:  # every layer: one attention and one FFN per token
        ffn_tokens = attention_tokens = cfg.num_layers * (i + o)
    else:  # encoder self; decoder self + cross
        ffn_tokens, attention_tokens = enc * i + dec * o, enc * i + 2 * dec * o
    total = 0
    if cfg.adapters:  # down + up per token per layer
        total += 2 * 2 * d * cfg.adapter_size * ffn_tokens
    if cfg.prefixes:  # scores and weighted values over P more keys, per query token
        total += 2 * 2 * cfg.prefix_length * inner * attention_tokens
    if cfg.lora:  # each target: x A then (x A) B
        widths = sum(sum(peft.lora_dims(cfg, target)) for target in cfg.lora_targets)
        total += 2 * cfg.lora_rank * widths * attention_tokens
    return total


def fusion_kv_flops(cfg: HintConfig, t: int) -> int:
    """The decoder's cross-attention keys/values of t instruction tokens (every layer)."""
    if not cfg.fusion:
        return 0
    _, memory, _ = stack_weights(cfg)
    return 2 * memory * t


def fusion_flops(cfg: HintConfig, t: int, o: int) -> int:
    """Decoder cross-attention of o output tokens over t more memory tokens (scores and
    weighted sum), for one input; the keys/values are fusion_kv_flops."""
    if not cfg.fusion:
        return 0
    return cfg.num_decoder_layers * 2 * 2 * t * cfg.inner_dim * o


def task_state_values(cfg: HintConfig, t: int) -> int:
    """Values HINT keeps per task (TaskModules): every generated tensor, plus with fusion the
    instruction's cross-attention keys and values in every decoder layer, 2 L_dec inner t (a
    decoder-only model's: its keys / values in every layer, with fusion or cached, 2 L kv_inner t)."""
    modules = sum(math.prod(shape) for shape in peft.shapes(cfg).values())
    if cfg.is_decoder_only:
        return modules + (kv_cache_values(cfg, t) if cfg.fusion or cfg.caches_instruction else 0)
    return modules + (2 * cfg.num_decoder_layers * cfg.inner_dim * t if cfg.fusion else 0)


def kv_cache_values(cfg: HintConfig, t: int) -> int:
    """A decoder-only model's keys / values of t instruction tokens, 2 L kv_inner t; for a T5,
    those of a decoder-only model of the same depth, 2 (L_enc + L_dec) inner t."""
    if cfg.is_decoder_only:
        return 2 * cfg.num_layers * cfg.kv_inner_dim * t
    return 2 * (cfg.num_layers + cfg.num_decoder_layers) * cfg.inner_dim * t


def instruction_flops(cfg: HintConfig | dict, t: int) -> float:
    """Forward FLOPs of one task's instruction of t tokens, paid once per task (HINT: the
    hyper-encoder, the generator and the fused keys / values; 0 without a hypernetwork). In
    training, once per distinct instruction of a micro-batch: that is what HintModel runs."""
    cfg = cfg if isinstance(cfg, HintConfig) else HintConfig.from_dict(cfg)
    if cfg.is_decoder_only and (cfg.hypernetwork or cfg.caches_instruction):
        body, _ = decoder_weights(cfg)  # no lm head: the pass keeps states and keys / values
        return float(2 * body * t + generator_flops(cfg, t))
    if not cfg.hypernetwork:
        return 0.0
    encoder, _, _ = stack_weights(cfg)
    return float(2 * encoder * t + generator_flops(cfg, t) + fusion_kv_flops(cfg, t))


def input_flops(cfg: HintConfig | dict, t: int, i: int, o: int) -> float:
    """Forward FLOPs of one input of i tokens and o output tokens whose task's instruction has
    t tokens (read by the fused cross-attention only; a concatenation model's rows carry the
    instruction in their i input tokens, unless a decoder-only one caches it)."""
    cfg = cfg if isinstance(cfg, HintConfig) else HintConfig.from_dict(cfg)
    if cfg.is_decoder_only:
        return float(2 * sum(decoder_weights(cfg)) * (i + o) + peft_flops(cfg, i, o))
    encoder, memory, decoder = stack_weights(cfg)
    flops = 2 * (encoder + memory) * i + 2 * decoder * o + peft_flops(cfg, i, o)
    return float(flops + (fusion_flops(cfg, t, o) if cfg.hypernetwork else 0))


def task_cost(cfg: HintConfig, n: int, t: int, i: int, o: int, bytes_per_value: int = 2) -> TaskCost:
    if cfg.is_decoder_only:
        body, head = decoder_weights(cfg)
        concat = 2 * (body + head) * n * (t + i + o)
        cached = 2 * body * t + 2 * (body + head) * n * (i + o)
    else:
        encoder, memory, decoder = stack_weights(cfg)
        concat = cached = 2 * (encoder + memory) * n * (t + i) + 2 * decoder * n * o
    hint = instruction_flops(cfg, t) + n * input_flops(cfg, t, i, o)
    return TaskCost(hint=float(hint), concat=float(concat), cached_concat=float(cached),
                    generator=float(generator_flops(cfg, t)),
                    fusion_kv=float(fusion_kv_flops(cfg, t)),
                    hint_state_bytes=task_state_values(cfg, t) * bytes_per_value,
                    kv_cache_bytes=kv_cache_values(cfg, t) * bytes_per_value)


def gflops_per_task(cfg: HintConfig | dict, n: int, i: int, t: int, target_len: int,
                    cached_instruction: bool = True) -> float:
    """Inference GFLOPs of one task of n inputs, for any variant: the number to report.

    i: input tokens of one example WITHOUT the instruction; t: instruction tokens;
    target_len: output tokens. A hypernetwork variant reads the instruction once (`task_cost`'s
    hint), and so does a decoder-only concatenation model that caches its keys / values (unless
    `cached_instruction` is False: the paper's decoder-only rows). A model without one reads it
    with every input (concatenation: t + i tokens, plus its static PEFT modules if any), except
    the No-Instruct variant, which reads no instruction.
    """
    cfg = cfg if isinstance(cfg, HintConfig) else HintConfig.from_dict(cfg)
    if cfg.hypernetwork or (cfg.caches_instruction and cached_instruction):
        return task_cost(cfg, n=n, t=t, i=i, o=target_len).hint / 1e9
    tokens = i + (0 if cfg.variant == "no_instruct" else t)
    return n * input_flops(cfg, 0, tokens, target_len) / 1e9
