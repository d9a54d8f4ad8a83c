"""Every variant at the paper's sizes (xl = HINT 3B, xxl = HINT 11B), built on the meta device
and run forward at the paper's lengths (hyper 1024 / input 1024 / target 256;
reference gins/ni_train.gin TASK_FEATURE_LENGTHS): shapes only, no memory, seconds.

At xl the component / decoder generators run ~53.6k slot queries per task: any tensor with two
dimensions that large (self-attention or a position bias among the queries) would take
hundreds of GB. A TorchDispatchMode sees every tensor every op makes."""

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hint_model import VARIANT_PRESETS, HintConfig, HintModel, peft
from hint_model.generator import slot_queries
from hint_model.memory import activation_values, meta_model, parameter_counts, training_memory
from hint_platform.cli import main
from tests.autograd_memory import saved_values

HYPER, INPUT, TARGET = 1024, 1024, 256


class QuadraticInQueries(TorchDispatchMode):
    """Fails on any op output with two dimensions each at least `queries` long, not counting
    the dimensions the model has whatever the query count (widths, vocabulary, lengths)."""

    def __init__(self, queries: int, fixed: set[int]):
        super().__init__()
        self.queries, self.fixed, self.ops = queries, fixed, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.ops += 1
                big = [n for n in t.shape if n >= self.queries and n not in self.fixed]
                assert len(big) < 2, f"{func} made a tensor of shape {tuple(t.shape)}, quadratic " \
                                     f"in the {self.queries} slot queries"
        return out


@pytest.mark.parametrize("size", ["xl", "xxl"])
def test_every_variant_runs_at_the_papers_size_and_lengths(size):
    seen = {}
    for variant in VARIANT_PRESETS:
        cfg = HintConfig.preset(size, variant=variant)
        model = meta_model(cfg)
        queries = slot_queries(cfg) if cfg.hypernetwork and cfg.generator != "pooled" else None
        with torch.device("meta"):
            hyper = torch.ones(1, HYPER, dtype=torch.long)
            ids = torch.ones(2, INPUT, dtype=torch.long)
            labels = torch.ones(2, TARGET, dtype=torch.long)
        fixed = {cfg.d_model, cfg.d_ff, cfg.inner_dim, cfg.vocab_size, cfg.generator_hidden,
                 HYPER, INPUT, TARGET}
        guard = QuadraticInQueries(queries or 10**12, fixed)
        with guard:
            # one task's modules (the public generate_modules reads the mask's values, which
            # the meta device does not have), then a forward of two inputs with them
            modules = model._modules_for(hyper, torch.ones_like(hyper)) if cfg.hypernetwork else None
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, modules=modules)
        assert out.logits.shape == (2, TARGET, cfg.vocab_size)
        if cfg.hypernetwork and cfg.uses_peft:
            assert {k: tuple(v.shape[1:]) for k, v in modules.peft.items()} == peft.shapes(cfg)
        if cfg.fusion:
            # the instruction as every decoder layer's cross-attention keys (once per task)
            assert modules.instruction_key.shape == (1, cfg.num_decoder_layers, HYPER, cfg.inner_dim)
        seen[variant] = (queries, guard.ops)
    print(size, seen)
    # adapters: 48 layers x (512 + 512 columns + 2 biases); prefixes: 72 slots x 2 x 30
    assert seen["hint"][0] == 48 * (512 + 512 + 2) + 72 * 60 == 53568  # DESIGN.md: ~53.6k
    assert seen["generator_decoder"][0] == seen["hint"][0]


def test_xl_sizes_and_memory_per_gpu():
    """The figures `hint train --dry-run` prints, at xl on 8 GPUs, micro-batch 8."""
    cfg = HintConfig.preset("xl", variant="hint")
    model = meta_model(cfg)
    counts = parameter_counts(cfg, model)
    assert abs(counts.t5 / 1e9 - 2.85) < 0.01 and counts.hyper_encoder == 0
    assert counts.total == counts.trainable == counts.t5 + counts.generator
    mem = training_memory(cfg, workers=8, micro_batch=8, hyper_len=HYPER, input_len=INPUT,
                          target_len=TARGET, model=model)
    assert mem.weights == 4 * counts.total / 8 and mem.gradients == mem.weights
    assert mem.optimizer < mem.weights / 100  # Adafactor's factored statistics
    # halving the workers doubles the sharded parts only
    half = training_memory(cfg, workers=4, micro_batch=8, hyper_len=HYPER, input_len=INPUT,
                           target_len=TARGET, model=model)
    assert half.weights == 2 * mem.weights and half.activations == mem.activations
    frozen = training_memory(HintConfig.preset("xl", variant="hypertune"), workers=8, micro_batch=8,
                             hyper_len=HYPER, input_len=INPUT, target_len=TARGET)
    assert frozen.gradients < frozen.weights / 3  # HyperTune trains its generator only


def test_train_dry_run_prints_parameters_and_memory_per_gpu(capsys):
    assert main(["train", "paper/hint-3b-sni-def", "train.num_workers=16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["train"]["z_loss"] == 1e-4  # the figures are YAML comments
    cfg = HintConfig.preset("xl", variant="hint")
    counts = parameter_counts(cfg)
    mem = training_memory(cfg, workers=16, micro_batch=8, hyper_len=HYPER, input_len=INPUT,
                          target_len=TARGET)
    assert f"{counts.total / 1e9:.3f}B parameters" in out
    assert f"memory per GPU (16 workers" in out and f"{mem.total / 2 ** 30:.1f} GiB" in out


@pytest.mark.parametrize("variant", ["hint", "generator_decoder", "concat"])
def test_activation_estimate_against_what_autograd_saves(variant):
    """The estimate (no checkpointing) against the bytes autograd really saves for backward in
    a forward on CPU, parameters left out: within 30% (the CPU attention also keeps its
    weights, which the fused GPU kernels do not)."""
    torch.manual_seed(0)
    cfg = HintConfig.preset("small", variant=variant, vocab_size=1000, num_layers=2,
                            num_decoder_layers=2)
    model = HintModel(cfg)
    batch, hyper, inputs, target = 2, 96, 96, 24
    measured = saved_values(model, input_ids=torch.randint(2, 1000, (batch, inputs)),
                            labels=torch.randint(2, 1000, (batch, target)),
                            hyper_input_ids=torch.randint(2, 1000, (batch, hyper)))
    estimate = activation_values(cfg, batch, hyper, inputs, target, checkpointing=False)
    print(f"{variant}: autograd saves {measured / 1e6:.1f}M values, estimate {estimate / 1e6:.1f}M")
    assert 0.7 < estimate / measured < 1.3
