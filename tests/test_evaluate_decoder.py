"""A decoder-only concat model through evaluation and the cached predictor: the instruction's
keys / values are the task's state, computed once per task, and give the outputs of the whole
prompt read at once; the report shows the FLOPs with and without that cache and its memory."""

import json

import pytest
import torch

from hint_model import HintModel
from hint_platform import config, export
from hint_platform.evaluation.evaluate import evaluate_export
from hint_platform.serving.predictor import CachedPredictor
from pipelines import formats, load_tokenizer
from tests.tiny_decoders import save_tiny_decoder, sni_texts, train_byte_bpe


@pytest.fixture(scope="module")
def opt_export(shared_data, tmp_path_factory):
    """A tiny random OPT (BOS `</s>`, pad `<pad>`) with a tokenizer trained here, exported as a
    concat model."""
    checkpoint = train_byte_bpe(sni_texts(shared_data / "sni"), tmp_path_factory.mktemp("opt"), "opt")
    save_tiny_decoder("opt", checkpoint)
    model = HintModel.from_hf_checkpoint(checkpoint, variant="concat", max_target_len=6)
    return export.write(model, tmp_path_factory.mktemp("export"), checkpoint)


def test_predictor_caches_the_instruction_and_answers_as_the_whole_prompt(opt_export):
    predictor = CachedPredictor(opt_export, max_new_tokens=6)
    tok = load_tokenizer(export.tokenizer_dir(opt_export))
    instruction, inputs = "Answer with the first word of the sentence.", ["the cat sat.", "a dog ran far."]
    outputs = predictor.predict([instruction] * 2, inputs)
    assert predictor.predict([instruction], inputs[:1]) == outputs[:1]
    assert (predictor.cache.stats.misses, predictor.cache.stats.hits) == (1, 1)
    key = predictor.reader.task_key(instruction)
    assert key[0] == tok.bos_ids[0] and tok.eos_id not in key[1:]
    state, _ = predictor.task_state(key)
    assert state.instruction_key is not None and state.nbytes > 0
    for text, out in zip(inputs, outputs):
        prompt = list(key) + predictor.reader.input_ids(instruction, text)
        assert tok.decode(prompt) == formats.sni_concat(instruction, [], 0, text)[1]
        ids = torch.tensor([prompt])
        whole = predictor.model.generate(ids, torch.ones_like(ids), max_new_tokens=6)
        assert out == tok.decode(whole[0].tolist()).strip()


def test_report_shows_flops_with_and_without_the_cache_and_its_memory(opt_export, shared_data, ray_local):
    sni = {"kind": "sni", "path": str(shared_data / "sni"), "split": "mini", "part": "test", "format": "concat",
           "num_pos": 2, "max_per_task": 2}
    cfg = config.from_dict({"data": {"eval": [sni], "max_input_len": 128, "max_hyper_len": 256,
                                     "max_target_len": 6}})
    report = evaluate_export(opt_export, cfg)
    overall = report.overall
    assert overall["gflops_per_task_uncached"] > overall["gflops_per_task"] > 0 and overall["kv_cache_mib"] > 0
    assert len(report.per_task) == 3 and 0 <= overall["rougeL"] <= 100
    assert json.loads((opt_export / "config.json").read_text())["config"]["model_type"] == "opt"
