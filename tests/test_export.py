"""Exports are atomic: a writer killed at any moment leaves either the previous export or none,
never a directory that passes for one; a damaged export is refused, by name, by every stage
that reads it."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hint_model import HintConfig, HintModel
from hint_platform import export
from hint_platform.config import ConfigError, from_dict
from hint_platform.export import ExportError
from hint_platform.training.preflight import check as preflight
from pipelines import train_tokenizer

# A writer of a large export (its weights plus ballast: a write that takes a moment) that says
# when it starts writing.
WRITER = """
import sys, torch
from hint_model import HintConfig, HintModel
from hint_platform import export
torch.manual_seed(1)
model = HintModel(HintConfig.preset("tiny", vocab_size=64))
state = dict(model.state_dict()) | {f"ballast.{i}": torch.ones(1 << 22) for i in range(48)}
print("writing", flush=True)
export.write(model, sys.argv[1], sys.argv[2], state_dict=state)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    train_tokenizer([f"the {w} item number {i}" for i in range(50) for w in ("red", "fox")],
                    root, vocab_size=64)
    return root


def tiny(seed: int = 0) -> HintModel:
    torch.manual_seed(seed)
    return HintModel(HintConfig.preset("tiny", vocab_size=64))


def open_files(pid: int) -> list[str]:
    try:
        return [os.readlink(fd) for fd in glob.glob(f"/proc/{pid}/fd/*")]
    except FileNotFoundError:  # an fd closed as we read
        return []


def kill_mid_write(target: Path, tokenizer: Path) -> None:
    """Runs WRITER into `target` and SIGKILLs it while it holds a weights file open (the writer
    at the lowest priority: the poller sees that moment on a busy machine too)."""
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", WRITER, str(target),
                             str(tokenizer)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 60
    while not any(f.endswith("/model.safetensors") for f in open_files(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never wrote"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "done" not in proc.stdout.read(), "the write finished before the kill: make it bigger"


def exports_under(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.is_dir() and export.is_export(p)]


def test_a_writer_killed_mid_write_leaves_the_previous_export_whole(tmp_path, tokenizer):
    target = tmp_path / "run" / "export"
    before = tiny(0)
    export.write(before, target, tokenizer)
    kill_mid_write(target, tokenizer)
    assert exports_under(target.parent) == [target]
    model, _ = export.load(target)  # every file checked against the manifest
    assert torch.equal(model.t5.shared.weight, before.t5.shared.weight)
    (partial,) = [p for p in target.parent.iterdir() if p != target]
    with pytest.raises(ExportError, match=rf"{partial.name}: incomplete model export: no manifest"):
        export.load(partial)
    after = tiny(2)
    export.write(after, target, tokenizer)  # the next write clears what the killed one left
    assert sorted(target.parent.iterdir()) == [target]
    assert torch.equal(export.load(target)[0].t5.shared.weight, after.t5.shared.weight)


def test_a_first_write_killed_leaves_no_export_and_the_load_says_why(tmp_path, tokenizer):
    target = tmp_path / "export"
    kill_mid_write(target, tokenizer)
    assert exports_under(tmp_path) == []
    with pytest.raises(ExportError, match=r"export: no model export there \(\.export\.partial-\w+ "
                                          r"beside it: a write that was interrupted\)"):
        export.load(target)


def test_truncated_or_altered_files_are_refused_naming_them(tmp_path, tokenizer):
    target = export.write(tiny(), tmp_path / "export", tokenizer)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    assert not export.is_export(target)
    with pytest.raises(ExportError, match=rf"model\.safetensors has {len(data) - 100} bytes, "
                                          rf"manifest\.json says {len(data)} \(truncated"):
        export.load(target)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ExportError, match=r"model\.safetensors does not match its sha256"):
        export.load(target)
    (target / "tokenizer" / "spiece.model").unlink()
    with pytest.raises(ExportError, match=r"tokenizer/spiece\.model is missing"):
        export.check(target)


def test_training_refuses_a_partial_export_as_init_from(tmp_path, tokenizer):
    target = export.write(tiny(), tmp_path / "export", tokenizer)
    (target / export.MANIFEST).unlink()  # as an export written in place and cut short
    cfg = from_dict({"model": {"init_from": str(target)},
                     "data": {"tokenizer": str(tokenizer),
                              "train": [{"kind": "sni", "path": str(tmp_path)}]}})
    with pytest.raises(ConfigError, match=rf"model\.init_from: {target}: incomplete model export"):
        preflight(cfg)


def test_a_directory_that_is_not_an_export_is_never_replaced(tmp_path, tokenizer):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"notes: exists and is not a model export"):
        export.write(tiny(), tmp_path / "notes", tokenizer)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
