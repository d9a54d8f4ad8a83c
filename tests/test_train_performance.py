"""The training step's fast path, on CPU: the multi-tensor Adafactor against torch's, a step
that never reads a value back from the device, gradients reduced once per step under
gradient accumulation, and the regionally compiled model's loss against the eager one's."""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from hint_model import HintConfig, HintModel
from hint_platform.config import TrainSection
from hint_platform.training.optim import Adafactor, build_optimizer
from hint_platform.training.parallel import compile_blocks, parallelize
from hint_platform.training.worker import train_step
from pipelines import step_micro_batches

SHAPE = dict(vocab_size=64, num_layers=1, num_decoder_layers=1)


def tiny(**overrides) -> HintModel:
    torch.manual_seed(0)
    return HintModel(HintConfig.preset("tiny", variant="hint", **SHAPE, **overrides))


def batch(seed: int, size: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(2, 64, (size, n), generator=g)  # noqa: E731
    hyper, inputs = ids(6), ids(5)
    inputs[0, -2:] = 0  # padding, masked
    labels = ids(4)
    labels[1, -1] = -100
    return {"hyper_input_ids": hyper, "hyper_attention_mask": torch.ones_like(hyper),
            "input_ids": inputs, "attention_mask": (inputs != 0).long(), "labels": labels}


def test_foreach_adafactor_equals_torch_adafactor():
    """Same updates as torch.optim.Adafactor (one tensor at a time) over several steps, on
    every parameter kind of the model (matrices, the generator's embeddings, norms' vectors)."""
    ours_model, torch_model = tiny(), tiny()
    ours = Adafactor(ours_model.parameters(), lr=1e-2, weight_decay=0.1)
    reference = torch.optim.Adafactor(torch_model.parameters(), lr=1e-2, weight_decay=0.1,
                                      foreach=False, maximize=False)
    for step in range(4):
        for model, optimizer in ((ours_model, ours), (torch_model, reference)):
            model(**batch(step)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, mine), theirs in zip(ours_model.named_parameters(), torch_model.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=name)


@contextlib.contextmanager
def host_reads(ignore: set[int]):
    """Counts reads of tensor values into Python (`.item()`, `.cpu()`, `.tolist()`, `float()`,
    `int()`, `bool()`) on tensors not in `ignore` (ids): each would wait for a GPU."""
    calls = []
    names = ("item", "cpu", "tolist", "__float__", "__int__", "__bool__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name):
        def read(self, *args, **kwargs):
            if id(self) not in ignore:
                calls.append(name)
            return saved[name](self, *args, **kwargs)
        return read

    for n in names:
        setattr(torch.Tensor, n, counting(n))
    try:
        yield calls
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_train_step_reads_nothing_back_from_the_device():
    """Four micro-batches, clipping and an Adafactor step, and not one value read back: the
    loss and gradient norm stay device scalars. (The optimizer's step counters are CPU
    scalars on a GPU too.) The concatenation baseline's model: HINT's forward itself checks
    its instructions' lengths and groups them by task on the device (model-side reads)."""
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("tiny", variant="concat", **SHAPE))
    optimizer = build_optimizer(model, TrainSection(optimizer="adafactor"))
    micro = [batch(i) for i in range(4)]
    train_step(model, optimizer, micro, grad_clip=1.0, z_loss=1e-4)  # creates the state
    counters = {id(s["step"]) for s in optimizer.state.values()}
    with host_reads(ignore=counters) as calls:
        out = train_step(model, optimizer, micro, grad_clip=1.0, z_loss=1e-4)
    assert calls == []
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    assert torch.isfinite(out["loss"]) and out["grad_norm"] > 0


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gradients_reduced_once_per_step_under_accumulation(one_rank_group, monkeypatch):
    """FSDP2 reduce-scatters after the last micro-batch only, and the step equals one big
    batch's (the loss is the mean over every target token of the step)."""
    sharded = parallelize(tiny(), device=torch.device("cpu"), fsdp=True,
                          activation_checkpointing=False)
    calls = []
    original = FSDPModule.set_requires_gradient_sync
    monkeypatch.setattr(FSDPModule, "set_requires_gradient_sync",
                        lambda self, on, **kw: (calls.append(on), original(self, on, **kw))[1])
    micro = [batch(i) for i in range(3)]
    loss = train_step(sharded, build_optimizer(sharded, TrainSection()), micro, 1.0, 1e-4)["loss"]
    assert calls == [False, False, True]
    whole = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
    plain = tiny()
    expected = train_step(plain, build_optimizer(plain, TrainSection()), [whole], 1.0, 1e-4)["loss"]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """Regional compilation (each T5 block, the generator's attention and MLPs) changes no
    result: the loss and every gradient as in eager mode. Dynamo's graphs run through AOT
    autograd without inductor's code generation, which takes minutes on 2 CPU cores
    (bench/gpu_check.sh compiles with inductor on the GPU)."""
    eager, compiled = tiny(), tiny()
    compile_blocks(compiled, backend="aot_eager")
    x = batch(0)
    losses = []
    for model in (eager, compiled):
        loss = model(**x).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_step_micro_batches_group_instructions_and_lengths():
    """A step's rows, interleaved across three tasks, come back as micro-batches that each
    hold one instruction and inputs of similar length: every row once, less padding."""
    instructions = {"a": [5, 6], "b": [7, 8, 9], "c": [4]}
    rows = [{"hyper_input_ids": instructions[task], "input_ids": [3] * n, "labels": [2],
             "example_index": i}
            for i, (task, n) in enumerate([("a", 9), ("b", 2), ("c", 5), ("a", 1), ("b", 8),
                                           ("c", 6), ("b", 9), ("b", 3)])]
    micro = step_micro_batches(rows, 2)
    assert sorted(r["example_index"] for m in micro for r in m) == list(range(8))
    assert [len({tuple(r["hyper_input_ids"]) for r in m}) for m in micro] == [1, 1, 1, 1]

    def padding(batches):
        return sum(max(len(r["input_ids"]) for r in m) * len(m) - sum(len(r["input_ids"]) for r in m)
                   for m in batches)

    assert padding(micro) < padding([rows[i:i + 2] for i in range(0, 8, 2)])
