"""An export loaded into another variant (the ablation studies start from a pretrained HINT):
a subset of its parameters (hint -> hint_no_fusion, adapters_only), a superset (adapters_only
-> hint: the new parts fresh), and a model of another shape refused."""

import pytest
import torch

from hint_model import CheckpointError, HintConfig, HintModel


def _export(tmp_path, variant: str) -> tuple[HintModel, str]:
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("tiny", variant=variant, vocab_size=64))
    model.save_pretrained(tmp_path / variant)
    return model, str(tmp_path / variant)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b)


@pytest.mark.parametrize("variant, dropped", [
    ("hint_no_fusion", []),
    ("adapters_only", ["generator.embeddings.prefix_key", "generator.embeddings.prefix_value",
                       "generator.mlps.prefix_key.fc1.weight", "generator.mlps.prefix_key.fc2.weight",
                       "generator.mlps.prefix_value.fc1.weight",
                       "generator.mlps.prefix_value.fc2.weight"]),
])
def test_hint_export_into_a_subset_variant(tmp_path, variant, dropped):
    source, directory = _export(tmp_path, "hint")
    model = HintModel.from_pretrained(directory, variant=variant)
    assert model.config == HintConfig.preset("tiny", variant=variant, vocab_size=64)
    assert model.load_report.dropped == dropped and model.load_report.initialised == []
    theirs = source.state_dict()
    assert all(_same(v, theirs[k]) for k, v in model.state_dict().items())
    assert HintModel.plan_from_pretrained(directory, variant=variant)[1] == model.load_report
    ids = torch.randint(2, 64, (2, 5))
    assert model(ids, labels=ids, hyper_input_ids=ids).logits.shape == (2, 5, 64)


def test_adapters_only_export_into_hint_initialises_the_prefix_generator(tmp_path):
    source, directory = _export(tmp_path, "adapters_only")
    model = HintModel.from_pretrained(directory, variant="hint")
    assert model.config == HintConfig.preset("tiny", variant="hint", vocab_size=64)
    report = model.load_report
    assert report.dropped == [] and len(report.initialised) == 6
    assert all(k.startswith(("generator.embeddings.prefix_", "generator.mlps.prefix_"))
               for k in report.initialised)
    assert "freshly initialised 6 tensor(s): generator.embeddings.prefix_key" in str(report)
    theirs = source.state_dict()
    assert all(_same(v, theirs[k]) for k, v in model.state_dict().items() if k in theirs)


@pytest.mark.parametrize("variant, part", [("untied_encoder", "hyper_encoder."),
                                           ("generator_decoder", "generator.decoder.")])
def test_parts_that_start_as_the_t5_start_as_the_loaded_one(tmp_path, variant, part):
    """A fresh untied hyper-encoder or decoder generator is seeded from the loaded T5 (as
    from_t5_checkpoint seeds it), not from the random one the model was built with."""
    _, directory = _export(tmp_path, "hint")
    model = HintModel.from_pretrained(directory, variant=variant)
    assert model.config == HintConfig.preset("tiny", variant=variant, vocab_size=64)
    assert any(k.startswith(part) for k in model.load_report.initialised)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    model.seed_from_t5()
    assert all(_same(loaded[k], v) for k, v in model.state_dict().items())


def test_another_shape_is_refused_naming_the_tensor(tmp_path):
    _, directory = _export(tmp_path, "hint")
    message = "generator.embeddings.adapter_down has shape (4, 8, 64), the model asked for has (4, 16, 64)"
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HintModel.from_pretrained(directory, variant="adapters_only", adapter_size=16)
    with pytest.raises(CheckpointError, match="has shape"):
        HintModel.plan_from_pretrained(directory, d_ff=256)
