"""Bad input: by default an error naming file and line (or task and template); with
on_bad_record="skip", skipped, counted, and visible in the rows."""

import gzip
import json
import random
import shutil

import pytest

from pipelines import BadRecordError, BadRecords, SpecError, iter_records

TASK = "task648_answer_generation"


@pytest.fixture
def tok(shared_data):
    return str(shared_data / "tokenizer" / "t5")


def c4_file(tmp_path, lines: list[bytes], name="bad.json.gz"):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"".join(line + b"\n" for line in lines)))
    return path


GOOD = json.dumps({"text": "A perfectly fine document about cats.", "url": "u"}).encode()


def run(specs, tok, policy="error", bad=None):
    return list(iter_records(specs, tok, max_input_len=32, max_hyper_len=32, max_target_len=16,
                             on_bad_record=policy, bad=bad))


def c4_spec(path):
    return {"kind": "c4", "path": str(path), "segment_len": 8}


@pytest.mark.parametrize("line, reason", [
    (b'{"text": "unterminated', "invalid JSON"),
    (json.dumps({"url": "no text"}).encode(), "missing or empty 'text'"),
    (b'{"text": "caf\xe9 au lait"}', r"not valid UTF-8 \(byte 0xe9"),
])
def test_c4_bad_line_names_file_and_line(tmp_path, tok, line, reason):
    path = c4_file(tmp_path, [GOOD, GOOD, line, GOOD])
    with pytest.raises(BadRecordError, match=rf"{path}:3: {reason}"):
        run([c4_spec(path)], tok)
    bad = BadRecords("skip")
    rows = run([c4_spec(path)], tok, "skip", bad)
    assert bad.skipped == 1 and bad.by_source == {str(path): 1}
    assert rows[-1]["bad_records_skipped"] == 1 and rows


def test_truncated_gzip(tmp_path, tok):
    rng = random.Random(0)  # varied text, so half of the compressed bytes hold many whole lines
    docs = [json.dumps({"text": " ".join(str(rng.random()) for _ in range(20))}).encode() for _ in range(500)]
    full = gzip.compress(b"".join(d + b"\n" for d in docs))
    path = tmp_path / "cut.json.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(BadRecordError, match=rf"{path}:\d+: corrupt or truncated gzip stream"):
        run([c4_spec(path)], tok)
    bad = BadRecords("skip")
    assert run([c4_spec(path)], tok, "skip", bad) and bad.skipped == 1


@pytest.fixture
def sni_dir(tmp_path, shared_data):
    """A checkout with two real tasks; tests break the second."""
    root = tmp_path / "sni"
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "s").mkdir(parents=True)
    names = [TASK, "task1393_superglue_copa_text_completion"]
    for name in names:
        shutil.copy(shared_data / "sni" / "tasks" / f"{name}.json", root / "tasks")
    (root / "splits" / "s" / "test_tasks.txt").write_text("\n".join(names) + "\n")
    return root


def sni_spec(root):
    return {"kind": "sni", "path": str(root), "split": "s", "part": "test", "max_per_task": 5}


def broken_task(root):
    path = root / "tasks" / "task1393_superglue_copa_text_completion.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("change, reason", [
    (lambda t: t.pop("Definition"), "missing 'Definition'"),
    (lambda t: t.pop("Instances"), "missing 'Instances'"),
    (lambda t: t.update(Definition=["  "]), "empty instruction"),
    (lambda t: t.update(Instances=[]), "task has no instances"),
])
def test_sni_bad_task_is_named(sni_dir, tok, change, reason):
    path, task = broken_task(sni_dir)
    change(task)
    path.write_text(json.dumps(task))
    with pytest.raises(BadRecordError, match=rf"{path}: {reason}"):
        run([sni_spec(sni_dir)], tok)
    bad = BadRecords("skip")
    rows = run([sni_spec(sni_dir)], tok, "skip", bad)
    assert len(rows) == 5 and {r["task"] for r in rows} == {TASK} and bad.skipped == 1


def test_sni_bad_instance_is_named(sni_dir, tok):
    path, task = broken_task(sni_dir)
    del task["Instances"][2]["output"]
    path.write_text(json.dumps(task))
    with pytest.raises(BadRecordError, match=rf"{path}: Instances\[2\]: needs a string 'input'"):
        run([sni_spec(sni_dir)], tok)
    bad = BadRecords("skip")
    assert len(run([sni_spec(sni_dir)], tok, "skip", bad)) == 10 and bad.skipped == 1


def test_sni_invalid_json_and_non_utf8_name_the_line(sni_dir, tok):
    path, _ = broken_task(sni_dir)
    lines = path.read_text().splitlines()
    path.write_bytes("\n".join(lines[:3]).encode() + b"\n  \"Source\": [\"\xff\"],\n" + "\n".join(lines[3:]).encode())
    with pytest.raises(BadRecordError, match=rf"{path}:4: not valid UTF-8 \(byte 0xff"):
        run([sni_spec(sni_dir)], tok)
    path.write_text("\n".join(lines[:3]) + "\n  oops,\n" + "\n".join(lines[3:]))
    with pytest.raises(BadRecordError, match=rf"{path}:4: invalid JSON"):
        run([sni_spec(sni_dir)], tok)


def test_sni_unknown_split_is_a_spec_error(sni_dir, tok):
    with pytest.raises(SpecError, match=r"unknown split 'nope'.*\(splits in .*: s\)"):
        run([{**sni_spec(sni_dir), "split": "nope"}], tok, "skip")


def test_template_that_fails_to_render_names_task_and_template(tmp_path, tok, caplog):
    (tmp_path / "tpl" / "toy").mkdir(parents=True)
    (tmp_path / "tpl" / "toy" / "templates.yaml").write_text(
        "dataset: toy\ntemplates:\n"
        "  a1: !Template\n    id: a1\n    name: ok\n    answer_choices: null\n    jinja: '{{q}} ||| {{a}}'\n"
        "  b2: !Template\n    id: b2\n    name: no filter\n    answer_choices: null\n    jinja: '{{q | nosuch}} ||| {{a}}'\n"
        "  c3: !Template\n    id: c3\n    name: no field\n    answer_choices: null\n    jinja: '{{q}} {{z}} ||| {{a}}'\n")
    (tmp_path / "toy.jsonl").write_text(json.dumps({"q": "What?", "a": "This."}) + "\n")
    spec = {"kind": "p3", "path": str(tmp_path / "toy.jsonl"), "templates": str(tmp_path / "tpl"),
            "dataset": "toy", "part": "train"}  # a test part renders only the scored templates
    with pytest.raises(BadRecordError, match=r"task toy/no (filter|field) \(template (b2|c3)\): record 0: "
                                             r"template failed to render: (No filter named 'nosuch'|'z' is undefined)"):
        run([spec], tok)
    bad = BadRecords("skip")
    rows = run([spec], tok, "skip", bad)
    assert [r["task"] for r in rows] == ["toy/ok"] and bad.skipped == 2
    assert "task toy/no field (template c3): record 0: template failed to render: 'z' is undefined" in caplog.text


def test_skips_are_counted_in_the_rows_and_reported_at_the_end(tmp_path, tok, caplog):
    c4_file(tmp_path, [GOOD] * 50, "good.json.gz")
    worse = c4_file(tmp_path, [b"{bad"] * 3, "worse.json.gz")
    rows = run([c4_spec(str(tmp_path / "*.json.gz"))], tok, "skip")
    assert rows and rows[-1]["bad_records_skipped"] == 3
    assert f"data: 3 bad record(s) skipped: {worse} (3)" in caplog.text
