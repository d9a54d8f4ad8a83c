"""Device placement for inference (hint_platform/placement.py): the device follows what Ray
assigned, the dtype rules, and a task-state cache bound sized from the model and the device that
holds one state at the longest instruction."""

import psutil
import pytest
import torch

from hint_model import HintConfig, HintModel
from hint_platform import export, placement
from hint_platform.errors import UserError
from hint_platform.evaluation.inference import task_modules


@pytest.mark.parametrize("assigned, cuda, expected", [
    (None, True, "cuda"),     # a plain process with a GPU
    (None, False, "cpu"),
    ([], True, "cpu"),        # a Ray worker that got no GPU: never cuda guessed
    ([], False, "cpu"),
    (["3"], True, "cuda:0"),  # Ray set CUDA_VISIBLE_DEVICES=3: the process sees it as cuda:0
    (["1", "2"], True, "cuda:0"),
])
def test_device_follows_the_gpus_ray_assigned(assigned, cuda, expected):
    assert placement.choose_device(assigned, cuda) == torch.device(expected)


def test_an_assigned_gpu_torch_cannot_see_is_an_error_not_a_silent_cpu_run():
    with pytest.raises(RuntimeError, match="Ray assigned GPU"):
        placement.choose_device(["0"], False)


def test_dtype_bf16_on_cuda_fp32_on_cpu_unless_asked():
    assert placement.inference_dtype("cuda:0") == torch.bfloat16
    assert placement.inference_dtype("cpu") == torch.float32
    assert placement.inference_dtype("cuda:0", "float32") == torch.float32
    assert placement.inference_dtype("cpu", "bfloat16") == torch.bfloat16
    with pytest.raises(UserError, match="valid are float32"):
        placement.inference_dtype("cpu", "fp8")


def test_cache_bound_holds_one_longest_state_where_memory_allows():
    assert placement.cache_bound(1000, 10, 0.5) == 500
    assert placement.cache_bound(1000, 800, 0.5) == 800  # raised to one longest state
    assert placement.cache_bound(500, 800, 0.5) == 250  # cannot fit: never more than is free
    assert placement.cache_bound(0, 800, 0.5) == 0


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from pipelines import train_tokenizer
    root = tmp_path_factory.mktemp("placement")
    tok = train_tokenizer(["one two three four five six seven"] * 20, root / "tok", vocab_size=40)
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("tiny", vocab_size=tok.vocab_size, max_hyper_len=64))
    export.write(model, root / "export", root / "tok")
    return root / "export"


def test_default_cache_bound_fits_a_state_at_the_longest_instruction(tiny_export):
    model, _ = export.load(tiny_export, device="cpu")
    bound = placement.default_cache_bytes(model)
    longest = task_modules(model, (3,) * model.config.max_hyper_len)
    assert placement.task_state_bytes(model) == longest.nbytes
    assert longest.nbytes <= bound <= psutil.virtual_memory().total


def test_export_loads_on_the_device_in_the_dtype_asked(tiny_export):
    model, _ = export.load(tiny_export, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not model.training
    model, _ = export.load(tiny_export, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_a_ray_worker_without_a_gpu_runs_on_the_cpu(ray_local):
    @ray_local.remote(num_cpus=0.1)
    def where():
        return placement.assigned_gpu_ids(), str(placement.inference_device())

    assert ray_local.get(where.remote()) == ([], "cpu")
    assert placement.assigned_gpu_ids() is None  # the driver: not a Ray worker


def test_model_processes_ask_for_gpus_when_the_cluster_has_them():
    gpu_cluster, cpu_cluster = {"CPU": 64.0, "GPU": 8.0}, {"CPU": 4.0}
    one_gpu = placement.model_process_resources(gpu_cluster)
    assert one_gpu == {"num_gpus": 1.0, "num_cpus": 1.0}
    assert placement.model_process_resources(gpu_cluster, gpus=0.5)["num_gpus"] == 0.5
    assert placement.model_process_resources(cpu_cluster, gpus=1, cpus=0.5) == {"num_cpus": 0.5}
    # One per GPU by default, never more than the GPUs hold, never more than the tasks.
    assert placement.model_process_count(gpu_cluster, one_gpu, None, 100) == 8
    assert placement.model_process_count(gpu_cluster, one_gpu, 20, 100) == 8
    assert placement.model_process_count(gpu_cluster, one_gpu, None, 3) == 3
    assert placement.model_process_count(gpu_cluster, {"num_gpus": 0.5}, None, 100) == 16
    assert placement.model_process_count(cpu_cluster, {"num_cpus": 1.0}, None, 100) == 1
    assert placement.model_process_count(cpu_cluster, {"num_cpus": 1.0}, 3, 2) == 2
