"""A request is read as the model's training data was: the export records the input format of
the run's train sources (P3 alone: T0's layout, no EOS after the input or the hypernetwork text;
anything else SNI's, EOS-terminated), and CachedPredictor, which every serving path goes
through, gives a request the token ids the training pipeline gave the same record. An export
without the record is SNI's, as before. Real P3 and SNI samples, the real T5 vocabulary; no Ray."""

from __future__ import annotations

import itertools
import json

import pytest

from hint_model import HintConfig, HintModel
from hint_platform import export
from hint_platform.export import DataFormat, ExportError
from hint_platform.serving.predictor import CachedPredictor
from hint_platform.training.checkpoint import export_model
from pipelines import TokenBudget, iter_records, load_tokenizer
from pipelines.dataset import as_specs, text_blocks
from tests.tiny_decoders import save_tiny_decoder, sni_texts, train_byte_bpe

T5_VOCAB = 32128


def p3_source(shared_data, fmt: str) -> dict:
    """RTE's validation records under every RTE template (the train part: templates interleaved)."""
    p3 = shared_data / "p3"
    return {"kind": "p3", "path": str(p3 / "raw" / "super_glue" / "rte" / "val.jsonl"),
            "templates": str(p3 / "promptsource_templates"), "dataset": "super_glue/rte", "format": fmt}


def trained_records(sources: list[dict], tokenizer_dir, causal: bool = False, n: int = 4) -> list[tuple[dict, dict]]:
    """The first `n` records of the training pipeline: (the reader's texts, the tokenised row) each."""
    budget = TokenBudget(load_tokenizer(tokenizer_dir), causal=causal)  # iter_records' default lengths
    texts = next(text_blocks(as_specs(sources), budget, on_bad_record="error", seed=0)).slice(0, n)
    return list(zip(texts.to_pylist(), itertools.islice(iter_records(sources, str(tokenizer_dir), causal=causal), n)))


def assert_served_as_trained(export_dir, records: list[tuple[dict, dict]]) -> None:
    predictor = CachedPredictor(export_dir, cache_mib=0)
    for texts, row in records:
        instruction = texts["hyper"] or "Answer."  # a model without a hypernetwork reads none apart
        assert list(predictor.reader.task_key(instruction)) == row["hyper_input_ids"]
        assert predictor.reader.input_ids(instruction, texts["input"]) == row["input_ids"]


@pytest.fixture(scope="module")
def t5_tokenizer(shared_data):
    return shared_data / "tokenizer" / "t5"


@pytest.mark.parametrize("variant, fmt", [("hint", "joint"), ("concat", "concat")])
def test_a_p3_run_records_t0s_layout_and_a_request_gets_the_ids_training_gave(
        shared_data, t5_tokenizer, tmp_path, variant, fmt):
    sources = [p3_source(shared_data, fmt)]
    out = tmp_path / "export"
    export_model(HintModel(HintConfig.preset("tiny", variant=variant, vocab_size=T5_VOCAB)), out, t5_tokenizer,
                 sources=sources)
    assert export.data_format(out) == DataFormat("p3", input_eos=False, formats=(fmt,))
    records = trained_records(sources, t5_tokenizer)
    eos = load_tokenizer(t5_tokenizer).eos_id
    for _, row in records:  # t0_tasks.py: add_eos=False on the inputs and hypernetwork inputs
        assert row["input_ids"][-1] != eos and row["labels"][-1] == eos
        assert (row["hyper_input_ids"][-1] != eos) if fmt == "joint" else row["hyper_input_ids"] == []
    assert len({texts["task"] for texts, _ in records}) > 1  # several templates
    assert_served_as_trained(out, records)


@pytest.fixture(scope="module")
def llama_base(shared_data, tmp_path_factory):
    """A tiny Llama with an OPT-style tokenizer: a BOS before every sequence."""
    base = train_byte_bpe(sni_texts(shared_data / "sni")[:500], tmp_path_factory.mktemp("llama"), "opt")
    save_tiny_decoder("llama", base)
    return base


@pytest.mark.parametrize("variant, fmt", [("lora_only", "joint"), ("concat", "concat")])
def test_a_decoder_only_p3_model_reads_a_request_in_the_causal_layout_as_training_did(
        shared_data, llama_base, tmp_path, variant, fmt):
    """BOS before the instruction (before the prompt when there is none), no EOS: the causal
    layout; a concat model has no instruction prefix here (T0's prompt carries it), unlike
    SNI's Tk-Instruct."""
    sources = [p3_source(shared_data, fmt)]
    out = tmp_path / "export"
    export_model(HintModel.from_hf_checkpoint(llama_base, variant=variant, lora_rank=8), out, llama_base,
                 sources=sources)
    records = trained_records(sources, llama_base, causal=True)
    bos = list(load_tokenizer(llama_base).bos_ids)
    assert all((row["hyper_input_ids"] or row["input_ids"])[:len(bos)] == bos for _, row in records)
    assert_served_as_trained(out, records)


@pytest.mark.parametrize("recorded", [True, False], ids=["sni-run", "no-record"])
def test_an_sni_export_or_one_without_the_record_reads_sni_with_eos(shared_data, t5_tokenizer, tmp_path, recorded):
    sources = [{"kind": "sni", "path": str(shared_data / "sni"), "split": "mini", "part": "test", "max_per_task": 2}]
    model = HintModel(HintConfig.preset("tiny", vocab_size=T5_VOCAB))
    out = tmp_path / "export"
    if recorded:
        export_model(model, out, t5_tokenizer, sources=sources)
    else:  # as an export from before the record, or one not written by training
        export.write(model, out, t5_tokenizer)
    assert (out / export.DATA_FORMAT).is_file() == recorded
    assert export.data_format(out) == (DataFormat("sni", True, ("def",)) if recorded else DataFormat())
    records = trained_records(sources, t5_tokenizer)
    eos = load_tokenizer(t5_tokenizer).eos_id
    assert all(row["input_ids"][-1] == eos and row["hyper_input_ids"][-1] == eos for _, row in records)
    assert_served_as_trained(out, records)


def test_only_a_run_of_p3_sources_alone_is_served_as_p3(tmp_path):
    p3 = {"kind": "p3", "path": "rte.jsonl", "templates": "templates", "dataset": "super_glue/rte", "format": "split"}
    rendered = {"kind": "p3_rendered", "path": "t0/*.jsonl.gz"}
    sni = {"kind": "sni", "path": "natural-instructions", "format": "def_pos"}
    assert DataFormat.of_sources([p3, rendered]) == DataFormat("p3", False, ("joint", "split"))
    assert DataFormat.of_sources([sni, rendered]) == DataFormat("sni", True, ("def_pos", "joint"))
    assert DataFormat.of_sources([{"kind": "c4", "path": "c4/*.json.gz"}]) == DataFormat("sni", True, ("pretrain",))
    (tmp_path / export.DATA_FORMAT).write_text(json.dumps({"family": "flan", "input_eos": True, "formats": []}))
    with pytest.raises(ExportError, match=r"data_format\.json: input format family 'flan' is not one of sni, p3"):
        export.data_format(tmp_path)


@pytest.mark.parametrize("family", ["p3", "decoder"])
def test_hint_predicts_driver_check_counts_an_instruction_as_the_actors_read_it(
        shared_data, t5_tokenizer, llama_base, tmp_path, family):
    """`hint predict` refuses a row before any model work exactly when the actor would: an
    instruction of max_hyper_len tokens as the model reads it (no EOS for P3; BOS and no EOS
    for a decoder) passes, one token more is refused naming the row."""
    import pyarrow as pa

    from hint_platform.errors import UserError
    from hint_platform.serving.batch import check_rows
    from hint_platform.serving.requests import BadRequest, RequestReader

    out = tmp_path / "export"
    if family == "p3":
        model = HintModel(HintConfig.preset("tiny", vocab_size=T5_VOCAB, max_hyper_len=32))
        export_model(model, out, t5_tokenizer, sources=[p3_source(shared_data, "joint")])
    else:
        model = HintModel.from_hf_checkpoint(llama_base, variant="lora_only", lora_rank=8, max_hyper_len=32)
        export_model(model, out, llama_base)
    reader = RequestReader.of_export(out)
    words = next(n for n in range(1, 64) if len(reader.task_key(" ".join(["yes"] * n))) == 32)
    fits, over = " ".join(["yes"] * words), " ".join(["yes"] * (words + 1))
    with pytest.raises(BadRequest):
        reader.task_key(over)
    check_rows(pa.table({"id": ["a"], "instruction": [fits]}), out, 1024)
    with pytest.raises(UserError, match="row b: instruction has 3[3-9] tokens, more than the model's max_hyper_len=32"):
        check_rows(pa.table({"id": ["a", "b"], "instruction": [fits, over]}), out, 1024)
