"""Decoder-only models: the instruction as a cached key/value prefix, generation with a
key/value cache against transformers' generate, and score."""

import pytest
import torch
from hf_decoders import reference, right_padded

from hint_model import HintConfig, HintModel


def _concat_rows(instr, instr_mask, ids, mask):
    """Each row's instruction followed by its input, right-padded: [B, M + L]."""
    rows = [torch.cat([i[m.bool()], x[k.bool()]]) for i, m, x, k in zip(instr, instr_mask, ids, mask)]
    width = max(len(r) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    out_mask = torch.zeros_like(out)
    for b, r in enumerate(rows):
        out[b, :len(r)], out_mask[b, :len(r)] = r, 1
    return out, out_mask


@pytest.mark.parametrize("preset,overrides", [
    ("llama-tiny", {}), ("llama-tiny", dict(prefixes=True, adapters=True, lora=True,
                                            lora_targets=["q", "k", "v", "o"], variant="static_peft"))])
def test_instruction_prefix_equals_concatenation(preset, overrides):
    torch.manual_seed(0)
    variant = overrides.pop("variant", "concat")
    model = HintModel(HintConfig.preset(preset, variant=variant, vocab_size=50, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    instr, instr_mask = right_padded([6, 3, 6], seed=2, vocab=50)
    ids, mask = right_padded([4, 5, 2], seed=3, vocab=50)
    joined, joined_mask = _concat_rows(instr, instr_mask, ids, mask)
    with torch.no_grad():
        prefixed = model(input_ids=ids, attention_mask=mask, hyper_input_ids=instr,
                         hyper_attention_mask=instr_mask).logits
        whole = model(input_ids=joined, attention_mask=joined_mask).logits
    for b, m in enumerate(instr_mask.sum(1).tolist()):
        n = int(mask[b].sum())
        assert (prefixed[b, :n] - whole[b, m:m + n]).abs().max() <= 1e-4


def test_no_instruct_reads_no_instruction():
    model = HintModel(HintConfig.preset("llama-tiny", variant="no_instruct", vocab_size=50)).eval()
    ids, mask = right_padded([4, 2], vocab=50)
    instr, instr_mask = right_padded([3, 3], seed=5, vocab=50)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        given = model(input_ids=ids, attention_mask=mask, hyper_input_ids=instr,
                      hyper_attention_mask=instr_mask).logits
    assert torch.equal(plain, given)
    assert model.generate_modules(instr[:1]).instruction_key is None


def _alone(ids, mask, b):
    n = int(mask[b].sum())
    return ids[b:b + 1, :n], mask[b:b + 1, :n]


def _until_eos(tokens: torch.Tensor, eos: int) -> list[int]:
    out = []
    for t in tokens.tolist():
        out.append(t)
        if t == eos:
            break
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt-post-ln-proj", "qwen2"])
def test_greedy_matches_transformers_generate(tmp_path, family):
    hf = reference(family, tmp_path)
    model = HintModel.from_hf_checkpoint(tmp_path, variant="no_instruct").eval()
    ids, mask = right_padded([7, 3, 5], seed=4)
    ours = model.generate(ids, mask, max_new_tokens=12)
    for b in range(3):
        prompt, prompt_mask = _alone(ids, mask, b)
        theirs = hf.generate(prompt, attention_mask=prompt_mask, max_new_tokens=12, do_sample=False,
                             num_beams=1, eos_token_id=2, pad_token_id=0)[0, prompt.shape[1]:]
        assert _until_eos(ours[b], 2) == _until_eos(theirs, 2)
        alone = model.generate(prompt, prompt_mask, max_new_tokens=12)[0]
        assert _until_eos(alone, 2) == _until_eos(ours[b], 2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_matches_transformers_and_each_row_alone(tmp_path, family):
    hf = reference(family, tmp_path)
    model = HintModel.from_hf_checkpoint(tmp_path, variant="no_instruct").eval()
    ids, mask = right_padded([6, 2, 4], seed=6)
    ours = model.generate(ids, mask, max_new_tokens=8, num_beams=3)
    for b in range(3):
        prompt, prompt_mask = _alone(ids, mask, b)
        theirs = hf.generate(prompt, attention_mask=prompt_mask, max_new_tokens=8, do_sample=False,
                             num_beams=3, early_stopping=False, length_penalty=1.0,
                             eos_token_id=2, pad_token_id=0)[0, prompt.shape[1]:]
        assert _until_eos(ours[b], 2) == _until_eos(theirs, 2)
        alone = model.generate(prompt, prompt_mask, max_new_tokens=8, num_beams=3)[0]
        assert _until_eos(alone, 2) == _until_eos(ours[b], 2)


def test_score_is_the_targets_log_probability(tmp_path):
    hf = reference("opt", tmp_path)
    model = HintModel.from_hf_checkpoint(tmp_path, variant="no_instruct").eval()
    ids, mask = right_padded([5, 2, 4], seed=7)
    targets, target_mask = right_padded([3, 1, 4], seed=8)
    labels = targets.masked_fill(target_mask == 0, -100)
    with torch.no_grad():
        ours = model.score(ids, mask, labels)
    for b in range(3):
        prompt, target = ids[b, :int(mask[b].sum())], targets[b, :int(target_mask[b].sum())]
        with torch.no_grad():
            logits = hf(input_ids=torch.cat([prompt, target])[None]).logits[0]
        logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        expected = logprobs.gather(1, target[:, None]).sum()
        assert abs(float(ours[b]) - float(expected)) <= 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_after_cached_instruction_equals_the_concatenated_prompt(num_beams):
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("llama-tiny", variant="concat", vocab_size=50)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    instr, _ = right_padded([5], seed=9, vocab=50)
    ids, mask = right_padded([4, 2, 3], seed=10, vocab=50)
    modules = model.generate_modules(instr)
    assert modules.instruction_key.shape == (1, 2, 5, model.config.kv_inner_dim)
    cached = model.generate(ids, mask, modules=modules, max_new_tokens=6, num_beams=num_beams)
    joined, joined_mask = _concat_rows(instr.expand(3, -1), torch.ones(3, 5, dtype=torch.long), ids, mask)
    assert torch.equal(cached, model.generate(joined, joined_mask, max_new_tokens=6,
                                              num_beams=num_beams))
    scored = model.score(ids, mask, cached, modules=modules)
    assert torch.allclose(scored, model.score(joined, joined_mask, cached), atol=1e-4)
