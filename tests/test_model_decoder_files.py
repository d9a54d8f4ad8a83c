"""Decoder-only checkpoints: strict key maps, sharded safetensors, bad directories refused
with the tensor or field named, and this package's own exports round-tripped."""

import json

import pytest
import torch
from hf_decoders import reference, right_padded
from safetensors.torch import load_file, save_file

from hint_model import CheckpointError, HintConfigError, HintModel
from hint_model.decoder_hint import DecoderHintModel


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_sharded_checkpoint_loads_as_one_file(tmp_path):
    hf = reference("llama", tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids, mask = right_padded([5, 3])
    one = HintModel.from_hf_checkpoint(tmp_path / "one", variant="concat").eval()
    sharded = HintModel.from_hf_checkpoint(tmp_path / "sharded", variant="concat").eval()
    assert torch.equal(_logits(one, ids, mask), _logits(sharded, ids, mask))


def test_pickle_is_refused(tmp_path):
    hf = reference("gpt2", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        HintModel.from_hf_checkpoint(tmp_path, variant="concat")


@pytest.mark.parametrize("change,message", [
    ("drop", "missing 1 tensor.*transformer.h.1.attn.c_attn.weight"),
    ("shape", r"transformer.h.1.attn.c_attn.weight has shape \(64, 100\), the config gives \(64, 192\)"),
    ("extra", "unexpected tensor 'transformer.h.2.ln_1.weight'"),
])
def test_bad_tensor_is_named(tmp_path, change, message):
    reference("gpt2", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = "transformer.h.1.attn.c_attn.weight"
    if change == "drop":
        del state[name]
    elif change == "shape":
        state[name] = torch.zeros(64, 100)
    else:
        state["transformer.h.2.ln_1.weight"] = torch.ones(64)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        HintModel.from_hf_checkpoint(tmp_path, variant="concat")


def test_unsupported_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(CheckpointError, match="'bloom' is not supported; supported: t5, gpt2, opt, "
                                              "llama, mistral, qwen2"):
        HintModel.from_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("family,variant,message", [
    ("gpt2", "hypertune", "generator='decoder'.*a gpt2 model has none"),
    ("opt-proj", "hint", "word_embed_proj_dim=32: the generator reads d_model=64 wide states"),
])
def test_impossible_variant_refused_before_any_weight_is_read(tmp_path, family, variant, message):
    reference(family, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")  # reading it would fail otherwise
    with pytest.raises(HintConfigError, match=message):
        HintModel.from_hf_checkpoint(tmp_path, variant=variant)


def test_unsupported_options_are_named(tmp_path):
    reference("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="RoPE scaling 'linear'"):
        HintModel.from_hf_checkpoint(tmp_path, variant="concat")


@pytest.mark.parametrize("family", ["opt-post-ln-proj", "qwen2"])
def test_export_round_trips(tmp_path, family):
    reference(family, tmp_path / "hf")
    model = HintModel.from_hf_checkpoint(tmp_path / "hf", variant="concat").eval()
    model.save_pretrained(tmp_path / "export")
    loaded = HintModel.from_pretrained(tmp_path / "export").eval()
    assert isinstance(loaded, DecoderHintModel) and loaded.config == model.config
    ids, mask = right_padded([4, 6])
    assert torch.equal(_logits(model, ids, mask), _logits(loaded, ids, mask))
    assert all(k.startswith("base.") for k in load_file(tmp_path / "export" / "model.safetensors"))
    cfg, report = HintModel.plan_from_pretrained(tmp_path / "export", variant="no_instruct")
    assert cfg.variant == "no_instruct" and str(report) == "every tensor loaded"



def test_the_base_is_recorded_through_exports_and_variants(tmp_path, monkeypatch):
    """A checkpoint in the hub's cache is recorded as its hub name and commit, any other as its
    absolute path; an export keeps it, and so does the variant built from that export."""
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "0123abcd"
    reference("llama", snapshot)
    model = HintModel.from_hf_checkpoint(snapshot, variant="lora_only")
    assert (model.config.base_model_name_or_path, model.config.base_revision) == ("org/tiny-llama", "0123abcd")
    model.save_pretrained(tmp_path / "export")
    again = HintModel.from_pretrained(tmp_path / "export", variant="concat")
    assert (again.config.base_model_name_or_path, again.config.base_revision) == ("org/tiny-llama", "0123abcd")

    reference("gpt2", tmp_path / "hub" / "models--gpt2" / "snapshots" / "4567")
    reference("gpt2", tmp_path / "models" / "gpt")
    monkeypatch.chdir(tmp_path / "hub")
    no_org = HintModel.from_hf_checkpoint("models--gpt2/snapshots/4567", variant="concat")
    assert (no_org.config.base_model_name_or_path, no_org.config.base_revision) == ("gpt2", "4567")
    local = HintModel.from_hf_checkpoint("../models/./gpt", variant="concat")
    assert (local.config.base_model_name_or_path, local.config.base_revision) == (str(tmp_path / "models" / "gpt"), None)
