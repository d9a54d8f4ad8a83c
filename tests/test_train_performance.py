"""The training step's fast path, on CPU: the multi-tensor Adafactor against torch's, a step
that never reads a value back from the device, gradients reduced once per step under
gradient accumulation, and the regionally compiled model's loss against the eager one's."""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from hint_model import HintConfig, HintModel
from hint_model.t5 import MASK_ALIGNMENT
from hint_platform.config import TrainSection
from hint_platform.training.optim import Adafactor, build_optimizer
from hint_platform.training.parallel import compile_blocks, parallelize
from hint_platform.training.worker import eval_loss, train_step
from pipelines.collate import collate, step_micro_batches

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


# ATen ops whose output size or result is a value on the device: on a GPU each waits for it.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
               "masked_select", "is_nonzero", "equal"}


class SyncingOps(TorchDispatchMode):
    """Records the syncing ATen ops that run (torch.unique, a boolean index, .item() from C++)."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.calls = ignore, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        bool_index = func.overloadpacket is torch.ops.aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if (name in SYNCING_OPS or bool_index) and not any(id(t) in self.ignore for t in tensors):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def device_reads(ignore: set[int]):
    """Counts every read of a tensor's value into Python (`.item()`, `.cpu()`, `.tolist()`,
    `float()`, `int()`, `bool()`) and every syncing op (SYNCING_OPS) on tensors not in
    `ignore` (ids): on a GPU each would wait for the device."""
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
        with SyncingOps(ignore) as ops:
            yield calls
        calls.extend(ops.calls)
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def hint_micro_batches(n: int) -> list[dict[str, torch.Tensor]]:
    """HINT micro-batches as the worker makes them (pipelines.collate): two tasks each."""
    g = torch.Generator().manual_seed(n)
    tokens = lambda k: torch.randint(2, 64, (k,), generator=g).tolist()  # noqa: E731
    out = []
    for _ in range(n):
        instructions = [tokens(6), tokens(4)]
        out.append(collate([{"hyper_input_ids": instructions[i % 2], "input_ids": tokens(3 + i),
                             "labels": tokens(2 + i % 3)} for i in range(4)]))
    return out


@pytest.mark.parametrize("variant", ["hint", "concat"])
def test_train_step_reads_nothing_back_from_the_device(variant):
    """Four micro-batches, clipping and an Adafactor step, and not one value read back: the
    loss and gradient norm stay device scalars, and HINT's forward takes its instructions
    grouped by task (no torch.unique, no length check by value). (The optimizer's step
    counters are CPU scalars on a GPU too.)"""
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("tiny", variant=variant, **SHAPE))
    optimizer = build_optimizer(model, TrainSection(optimizer="adafactor"))
    micro = hint_micro_batches(4)
    train_step(model, optimizer, micro, grad_clip=1.0, z_loss=1e-4)  # creates the state
    counters = {id(s["step"]) for s in optimizer.state.values()}
    with device_reads(ignore=counters) as calls:
        out = train_step(model, optimizer, micro, grad_clip=1.0, z_loss=1e-4)
    assert calls == []
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    assert torch.isfinite(out["loss"]) and out["grad_norm"] > 0


def test_the_read_counter_sees_grouping_by_value():
    """The counter can fail: HINT given one instruction per example groups them itself, with
    torch.unique and a length check that read the device."""
    model = tiny()
    with device_reads(ignore=set()) as calls:
        model(**batch(0))
    assert "_unique2" in calls or "unique_dim" in calls
    assert "__int__" in calls


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


def test_blocks_kept_gathered_to_backward_take_the_same_steps(one_rank_group):
    """train.reshard_after_forward=false: after a forward the blocks hold their gathered
    weights (plain tensors, not the DTensor shards) and the steps are the resharded ones; an
    evaluation (forwards, no backward: the last step's, before the export gathers the model
    again) frees them."""
    rows = [{"hyper_input_ids": [5, 6, 7], "input_ids": [8, 9], "labels": [10, 11]}] * 2
    losses = {}
    for reshard in (True, False):
        model = parallelize(tiny(), device=torch.device("cpu"), fsdp=True,
                            activation_checkpointing=False, reshard_after_forward=reshard)
        optimizer = build_optimizer(model, TrainSection(optimizer="adamw"))
        block = next(iter(model.blocks()))
        losses[reshard] = [float(train_step(model, optimizer, [batch(i)], 1.0, 1e-4)["loss"]) for i in range(2)]
        with torch.no_grad():
            model(**batch(0))
        assert isinstance(next(block.parameters()), DTensor) is reshard
        losses[reshard].append(eval_loss(model, rows, 2, torch.device("cpu")))
        assert isinstance(next(block.parameters()), DTensor)
        losses[reshard].append(float(train_step(model, optimizer, [batch(2)], 1.0, 1e-4)["loss"]))
    assert losses[False] == pytest.approx(losses[True], rel=1e-6)


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


class SdpaCalls(TorchFunctionMode):
    """Records the query, keys, values and mask of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((*args[:3], kwargs.get("attn_mask")))
        return func(*args, **kwargs)


def fused_kernel_refusals(q, k, v, mask) -> list[str]:
    """What in one call would keep SDPA on a GPU from its fused kernels (the constraints of
    torch's sdp_utils for the memory-efficient kernel), or make it copy the mask per call."""
    found = []
    if any(t.stride(-1) != 1 for t in (q, k, v, mask)):
        found.append("last dimension not contiguous")
    if mask.dtype != q.dtype or k.dtype != q.dtype or v.dtype != q.dtype:
        found.append("dtypes differ")
    if any(s % MASK_ALIGNMENT for s in mask.stride()[:-1]):
        found.append("mask rows unaligned")
    if q.shape[-1] % 8 or any(t.storage_offset() % 8 for t in (q, k, v)):
        found.append("head dim or storage offset unaligned")
    return found


@pytest.mark.parametrize("variant", ["hint", "concat", "hypertune"])
def test_attention_takes_fused_kernel_masks_built_once_per_stack(variant):
    """Every attention call (training, with the learned position bias requiring grad) passes
    what the fused kernels take, and the layers of a stack share one mask: the decoder's
    permuted position bias once sent every decoder self-attention to the math kernel, and the
    prefix columns were padded into a copy of the encoder's [B, H, L, L] mask at every layer."""
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("tiny", variant=variant, vocab_size=64, num_layers=3,
                                        num_decoder_layers=3))
    micro = hint_micro_batches(1)[0]
    with SdpaCalls() as sdpa:
        model(**micro).loss.backward()
    assert sdpa.calls and all(mask is not None for *_, mask in sdpa.calls)
    assert [fused_kernel_refusals(*call) for call in sdpa.calls] == [[]] * len(sdpa.calls)
    # one mask each: [hyper-encoder, generator,] encoder, decoder self- and cross-attention
    masks = {mask.data_ptr() for *_, mask in sdpa.calls}
    assert len(masks) == (5 if model.config.hypernetwork else 3) < len(sdpa.calls)
