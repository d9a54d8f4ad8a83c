"""Hugging Face tokenizers (tokenizer.json, byte-level BPE trained here) and the causal data
layout of decoder-only models, on the real SNI sample: rows, batches, exports."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from hint_model import HintConfig, HintModel
from hint_platform import export
from pipelines import SourceSpec, SpecError, formats, iter_records, load_tokenizer
from pipelines.collate import collate
from tests.tiny_decoders import sni_texts, train_byte_bpe

TEXT = "Definition: Answer with the word in the sentence.\nOutput: shakespeare"
ALGEBRA = "task664_mmmlu_answer_generation_abstract_algebra"


@pytest.fixture(scope="module")
def tokenizers(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    texts = sni_texts(shared_data / "sni")
    return {family: train_byte_bpe(texts, root / family, family) for family in ("gpt2", "opt")}


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_tokenizer_json_encodes_as_transformers_does(tokenizers, family):
    """The same ids as transformers' fast tokenizer on the same files; EOS appended by `encode`,
    the BOS (OPT's `</s>`) left to the data layout; pad from the tokenizer (GPT-2: none, the EOS)."""
    tok, reference = load_tokenizer(tokenizers[family]), PreTrainedTokenizerFast.from_pretrained(tokenizers[family])
    ids = reference(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.encode(TEXT) == ids + [reference.eos_token_id]
    assert tok.encode(TEXT, eos=False) == ids and tok.encode(TEXT, max_len=4) == ids[:3] + [tok.eos_id]
    assert tok.encode_batch([TEXT, "x"], eos=False) == [ids, reference("x", add_special_tokens=False)["input_ids"]]
    assert list(tok.bos_ids) == reference(TEXT)["input_ids"][:len(reference(TEXT)["input_ids"]) - len(ids)]
    assert tok.pad_id == (reference.pad_token_id if family == "opt" else reference.eos_token_id)
    assert tok.vocab_size == len(reference)
    assert tok.decode(list(tok.bos_ids) + tok.encode(TEXT) + [tok.pad_id, -100]) == TEXT


def test_special_ids_from_side_files_or_the_model_config(shared_data, tmp_path):
    """eos from tokenizer_config.json, else special_tokens_map.json, else config.json's ids;
    none: an error that says where it looked."""
    texts = sni_texts(shared_data / "sni")[:500]
    plain = train_byte_bpe(texts, tmp_path / "a", "opt", config={})
    with pytest.raises(ValueError, match="names no EOS token"):
        load_tokenizer(plain)
    (plain / "config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 1}))
    assert (load_tokenizer(plain).eos_id, load_tokenizer(plain).pad_id) == (2, 1)
    (plain / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    assert load_tokenizer(plain).eos_id == 3
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in"):
        load_tokenizer(plain)


def test_export_copies_only_the_tokenizer_files(tokenizers, tmp_path):
    """A Hugging Face checkpoint directory is also its tokenizer's: the export takes the
    tokenizer's files, not the weights, and names the EOS so the copy reads the same ids."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.json").write_text((tokenizers["gpt2"] / "tokenizer.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2", "eos_token_id": 0}))
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    assert export.tokenizer_dir(checkpoint) == checkpoint
    model = HintModel(HintConfig.preset("tiny", variant="no_instruct", vocab_size=600))
    out = export.write(model, tmp_path / "export", export.tokenizer_dir(checkpoint))
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert export.is_export(out) and export.tokenizer_dir(out) == out / "tokenizer"
    copy, original = load_tokenizer(out / "tokenizer"), load_tokenizer(checkpoint)
    assert (copy.eos_id, copy.pad_id, copy.encode(TEXT)) == (original.eos_id, original.pad_id, original.encode(TEXT))


def sni(format: str, num_pos: int = 0, part: str = "test") -> dict:
    return {"kind": "sni", "path": "", "split": "mini", "part": part, "format": format,
            "num_pos": num_pos, "max_per_task": 5}


def rows(shared_data, tokenizer_dir, spec, **lengths):
    spec = {**spec, "path": str(shared_data / "sni")}
    return list(iter_records([spec], str(tokenizer_dir), causal=True, **lengths))


def test_causal_concat_rows_put_the_instruction_in_hyper(shared_data, tokenizers):
    """Tk-Instruct's string, cut where the instance starts: the instruction (BOS first, no EOS)
    is the same for every row of a task, the input ends in the output cue (no EOS), the target
    ends in the EOS. Joined, they are the string a T5 Tk-Instruct row holds."""
    tok = load_tokenizer(tokenizers["opt"])
    got = rows(shared_data, tokenizers["opt"], sni("concat", 2))
    task = json.loads((shared_data / "sni" / "tasks" / f"{got[0]['task']}.json").read_text())
    by_task = {}
    for row in got:
        by_task.setdefault(row["task"], set()).add(tuple(row["hyper_input_ids"]))
        assert row["hyper_input_ids"][:1] == [tok.eos_id] and tok.eos_id not in row["hyper_input_ids"][1:]
        assert row["input_ids"][-len(tok.encode("\nOutput:", eos=False)):] == tok.encode("\nOutput:", eos=False)
        assert tok.eos_id not in row["input_ids"] and row["labels"][-1] == tok.eos_id
    assert all(len(hypers) == 1 for hypers in by_task.values()) and len(by_task) == 3
    first = got[0]
    _, whole = formats.sni_concat(task["Definition"][0], task["Positive Examples"], 2, task["Instances"][0]["input"])
    assert tok.decode(first["hyper_input_ids"] + first["input_ids"]) == whole


def test_causal_instruction_keeps_the_examples_that_fit_its_own_length(shared_data, tokenizers):
    tok = load_tokenizer(tokenizers["gpt2"])
    full = rows(shared_data, tokenizers["gpt2"], sni("concat", 2))[0]
    assert "Positive Example 2" in tok.decode(full["hyper_input_ids"])
    short = rows(shared_data, tokenizers["gpt2"], sni("concat", 2), max_hyper_len=len(full["hyper_input_ids"]) - 1)[0]
    assert "Positive Example 2" not in tok.decode(short["hyper_input_ids"])
    assert len(short["hyper_input_ids"]) < len(full["hyper_input_ids"]) and short["input_ids"] == full["input_ids"]


def test_causal_long_input_keeps_its_output_cue(shared_data, tokenizers):
    tok = load_tokenizer(tokenizers["gpt2"])
    cue = tok.encode("\nOutput:", eos=False)
    for row in rows(shared_data, tokenizers["gpt2"], sni("concat", 0), max_input_len=24):
        assert len(row["input_ids"]) <= 24 and row["input_ids"][-len(cue):] == cue


def test_causal_no_instruct_starts_the_input_with_the_bos(shared_data, tokenizers):
    tok = load_tokenizer(tokenizers["opt"])
    for row in rows(shared_data, tokenizers["opt"], sni("no_instruct")):
        assert row["hyper_input_ids"] == [] and row["input_ids"][0] == tok.bos_ids[0]
        assert tok.eos_id not in row["input_ids"][1:] and row["labels"][-1] == tok.eos_id


def test_causal_batches_line_up_labels_with_the_next_token():
    """labels[:, j] is the token after input_ids[:, j]: -100 over the prompt but its last
    position, then the target and its EOS; right padding."""
    rows_ = [{"hyper_input_ids": [7, 8], "input_ids": [10, 11, 12], "labels": [20, 21, 2]},
             {"hyper_input_ids": [7, 8], "input_ids": [13], "labels": [22, 2]}]
    batch = collate(rows_, pad_id=5, causal=True)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [13, 22, 5, 5, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 20, 21, 2], [22, 2, -100, -100, -100]]
    assert batch["task_index"].tolist() == [0, 0] and batch["hyper_input_ids"].tolist() == [[7, 8]]
    with pytest.raises(ValueError, match="non-empty input"):
        collate([{"hyper_input_ids": [], "input_ids": [], "labels": [2]}], causal=True)


@pytest.mark.parametrize("fmt", ["pretrain", "caclm"])
def test_c4_pretraining_rows_in_the_causal_layout(shared_data, tokenizers, fmt):
    """The decoder-only form of C4 pretraining (issue 20): the same draws as T5's rows, x1 to the
    hypernetwork (with OPT's BOS), the model continues x2 with x3 and the loss is on x3 + EOS:
    no EOS ends the prompt, and x2 is never empty (where T5's draw left it empty, x3's first
    token moved to it). Rows collate into the causal batch."""
    tok = load_tokenizer(tokenizers["opt"])
    spec = {"kind": "c4", "path": str(shared_data / "c4" / "c4-en.olmo-test-fixtures.json.gz"),
            "format": fmt, "segment_len": 16}
    lengths = {"max_input_len": 64, "max_hyper_len": 64, "max_target_len": 64}
    t5_rows = list(iter_records([spec], tokenizers["opt"], seed=1, **lengths))
    causal_rows = list(iter_records([spec], tokenizers["opt"], seed=1, causal=True, **lengths))
    assert len(causal_rows) == len(t5_rows) > 50
    moved = 0
    for t5_row, row in zip(t5_rows, causal_rows):
        assert row["hyper_input_ids"][0] == tok.bos_ids[0] and row["input_ids"]
        assert row["labels"][-1] == tok.eos_id
        if t5_row["input_ids"] == [tok.eos_id]:  # T5's x2 was empty: x3's first token moved
            moved += 1
            if fmt == "pretrain":
                assert row["input_ids"] + row["labels"] == t5_row["labels"]
            continue
        # the same cut, less the EOS after the hypernetwork's part and the input
        assert row["hyper_input_ids"][1:] == t5_row["hyper_input_ids"][:-1]
        assert row["input_ids"] == t5_row["input_ids"][:-1] and row["labels"] == t5_row["labels"]
    assert moved > 0
    batch = collate(causal_rows[:4], pad_id=tok.pad_id, causal=True)
    assert (batch["labels"] != -100).sum() == sum(len(r["labels"]) for r in causal_rows[:4])

