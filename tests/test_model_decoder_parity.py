"""Decoder-only models (GPT-2, OPT, Llama / Mistral / Qwen2) against transformers'
AutoModelForCausalLM on the same weights, loaded through HintModel.from_hf_checkpoint."""

import pytest
import torch
from hf_decoders import CONFIGS, reference, right_padded

from hint_model import HintModel


@pytest.mark.parametrize("variant", ["no_instruct", "concat"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_logits_match_transformers_with_right_padding(tmp_path, family, variant):
    hf = reference(family, tmp_path)
    model = HintModel.from_hf_checkpoint(tmp_path, variant=variant).eval()
    ids, mask = right_padded([9, 5, 1])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert ours.shape == theirs.shape
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4
    assert theirs[real].std() > 0.1  # the check compares something


def test_family_maps_onto_our_config(tmp_path):
    reference("qwen2", tmp_path / "qwen2")
    reference("opt-post-ln-proj", tmp_path / "opt")
    qwen = HintModel.from_hf_checkpoint(tmp_path / "qwen2", variant="concat").config
    assert (qwen.model_type, qwen.attention_bias, qwen.tie_word_embeddings, qwen.kv_heads) == (
        "llama", True, True, 2)
    opt = HintModel.from_hf_checkpoint(tmp_path / "opt", variant="no_instruct").config
    assert (opt.do_layer_norm_before, opt.word_embed_proj_dim, opt.num_decoder_layers) == (False, 32, 0)
