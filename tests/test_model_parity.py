"""Our T5 against transformers' T5ForConditionalGeneration on the same weights (fp32)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration

from hint_model import CheckpointError, HintModel
from hint_model.checkpoint import hf_name

SHAPES = {
    # v1.1: gated-GELU, untied lm head, no output rescale; decoder deeper than the encoder
    "v1_1": dict(feed_forward_proj="gated-gelu", num_heads=4, num_layers=2, num_decoder_layers=3,
                 untie=True),
    # v1.0: ReLU, tied lm head with the d_model**-0.5 rescale; other head / layer counts
    "v1_0": dict(feed_forward_proj="relu", num_heads=2, num_layers=3, num_decoder_layers=2,
                 untie=False),
}


def hf_t5(tmp_path, name, max_shard_size=None):
    """A random transformers T5 saved to tmp_path/name; returns (model, directory)."""
    spec = dict(SHAPES[name])
    untie = spec.pop("untie")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, dropout_rate=0.0,
                   decoder_start_token_id=0, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, **spec)
    model = T5ForConditionalGeneration(cfg).eval()
    if untie:  # transformers 5 always ties in memory; a v1.1 checkpoint has its own lm head
        model.lm_head.weight = torch.nn.Parameter(torch.randn(120, 32))
        model.config.scale_decoder_outputs = False
    directory = tmp_path / name
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model, directory


def batch():
    torch.manual_seed(1)
    ids = torch.randint(2, 120, (3, 20))  # 20 > max_distance / 2: the log buckets are used
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    decoder_ids = torch.randint(2, 120, (3, 9))
    return ids, mask, decoder_ids


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_and_greedy_tokens_match_transformers(tmp_path, name):
    hf, directory = hf_t5(tmp_path, name)
    ours = HintModel.from_t5_checkpoint(directory, variant="no_instruct").eval()
    assert ours.config.tie_word_embeddings == (name == "v1_0")
    assert ours.config.scale_decoder_outputs == (name == "v1_0")
    ids, mask, decoder_ids = batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        mine = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert (theirs - mine).abs().max().item() <= 1e-4

    # transformers' cache breaks with unequal layer counts; its uncached path is the reference.
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                           num_beams=1, use_cache=False)
    got = ours.generate(ids, mask, max_new_tokens=12)
    assert got.tolist() == expected[:, 1:].tolist()  # ours returns new tokens only


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf, directory = hf_t5(tmp_path, "v1_1", max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    ours = HintModel.from_t5_checkpoint(directory, variant="no_instruct").eval()
    ids, mask, decoder_ids = batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        mine = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert (theirs - mine).abs().max().item() <= 1e-4


def test_hint_variant_keeps_t5_weights_and_copies_untied_encoder(tmp_path):
    hf, directory = hf_t5(tmp_path, "v1_1")
    model = HintModel.from_t5_checkpoint(directory, variant="untied_encoder")
    assert torch.equal(model.t5.shared.weight, hf.shared.weight)
    assert torch.equal(model.hyper_encoder.blocks[1].ffn.wo.weight,
                       hf.encoder.block[1].layer[1].DenseReluDense.wo.weight)
    assert model.generator is not None


def test_missing_directory_and_pickle_only_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        HintModel.from_t5_checkpoint(tmp_path / "nope")
    _, directory = hf_t5(tmp_path, "v1_0")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        HintModel.from_t5_checkpoint(directory)


def test_missing_unexpected_and_misshapen_tensors_name_the_key(tmp_path):
    _, directory = hf_t5(tmp_path, "v1_1")
    path = directory / "model.safetensors"
    original = load_file(path)

    def write(state):
        save_file(state, path, metadata={"format": "pt"})

    key = "decoder.block.2.layer.2.DenseReluDense.wi_1.weight"
    write({k: v for k, v in original.items() if k != key})
    with pytest.raises(CheckpointError, match=f"missing.*{key}"):
        HintModel.from_t5_checkpoint(directory)

    write({**original, "encoder.block.9.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'encoder.block.9"):
        HintModel.from_t5_checkpoint(directory)

    write({**original, key: torch.zeros(48, 31)})
    with pytest.raises(CheckpointError, match=f"{key} has shape \\(48, 31\\)"):
        HintModel.from_t5_checkpoint(directory)


def test_shard_listed_in_index_but_absent_is_an_error(tmp_path):
    _, directory = hf_t5(tmp_path, "v1_0", max_shard_size="20KB")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (directory / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        HintModel.from_t5_checkpoint(directory)


def test_t5_checkpoint_is_not_taken_for_our_export(tmp_path):
    _, directory = hf_t5(tmp_path, "v1_0")
    with pytest.raises(CheckpointError, match="from_t5_checkpoint"):
        HintModel.from_pretrained(directory)


def test_training_gradients_match_transformers(tmp_path):
    hf, directory = hf_t5(tmp_path, "v1_1")
    ours = HintModel.from_t5_checkpoint(directory, variant="no_instruct")
    hf.train()
    ids, mask, labels = batch()
    labels[2, 6:] = -100
    hf(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name in ("t5.encoder.relative_bias.weight", "t5.decoder.relative_bias.weight",
                 "t5.encoder.blocks.0.attn.q.weight", "t5.decoder.blocks.2.cross_attn.k.weight",
                 "t5.decoder.blocks.1.ffn.wi_0.weight", "t5.shared.weight", "t5.lm_head.weight"):
        theirs = hf.get_parameter(hf_name(name.removeprefix("t5."))).grad
        torch.testing.assert_close(ours.get_parameter(name).grad, theirs, atol=1e-5, rtol=1e-4)
