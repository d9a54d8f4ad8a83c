"""Super-Natural Instructions: task JSON files and split lists, in the checkout's own layout.

A checkout holds `tasks/<task>.json` (Definition, Positive Examples, Instances[{id, input,
output[]}], ...) and `splits/<split>/{train,test}_tasks.txt` (one task name a line). Each task
gives at most `max_per_task` instances: a seeded shuffle for the train part, the first N for
test (as the paper and Tk-Instruct do). The target is the first output; all outputs are kept as
references for ROUGE-L.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipelines import files, formats
from pipelines.bad_records import BadRecords
from pipelines.example import Example
from pipelines.spec import SourceSpec, SpecError

log = logging.getLogger(__name__)


def split_tasks(spec: SourceSpec) -> list[str]:
    """Task names of splits/<split>/<part>_tasks.txt whose files exist (missing ones: an error
    listing them, or with allow_missing_tasks a warning with the count)."""
    split_dir = files.join(spec.path, "splits", spec.split)
    listing = files.join(split_dir, f"{spec.part}_tasks.txt")
    if not files.exists(listing):
        listings = files.expand(files.join(spec.path, "splits", "*", "*_tasks.txt"))
        known = sorted({p.split("/")[-2] for p in listings})
        raise SpecError(f"sni: unknown split {spec.split!r}: {listing} not found "
                        f"(splits in {spec.path}: {', '.join(known) or 'none'})")
    with files.open_binary(listing) as f:
        names = [line.strip() for line in f.read().decode("utf-8").splitlines() if line.strip()]
    missing = [n for n in names if not files.exists(task_path(spec, n))]
    if missing and not spec.allow_missing_tasks:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise SpecError(f"sni: {listing} names {len(missing)} task(s) with no file under "
                        f"{files.join(spec.path, 'tasks')}: {', '.join(missing[:10])}{more} "
                        "(set allow_missing_tasks: true to use the tasks that are present)")
    if missing:
        log.warning("sni: %d of %d tasks of %s have no file; using the %d present",
                    len(missing), len(names), listing, len(names) - len(missing))
    absent = set(missing)
    return [n for n in names if n not in absent]


def task_path(spec: SourceSpec, name: str) -> str:
    return files.join(spec.path, "tasks", f"{name}.json")


def load_task(path: str, bad: BadRecords) -> dict | None:
    """The task's JSON, checked; None (after reporting) when the file is bad."""
    text = files.read_text(path, bad)
    if text is None:
        return None
    try:
        task = json.loads(text)
    except json.JSONDecodeError as e:
        bad.report(path, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno)
        return None
    for key in ("Definition", "Instances"):
        if key not in task:
            bad.report(path, f"missing {key!r}")
            return None
    definition = task["Definition"]
    definition = definition[0] if isinstance(definition, list) and definition else definition
    if not isinstance(definition, str) or not definition.strip():
        bad.report(path, "empty instruction: 'Definition' has no text")
        return None
    task["Definition"] = definition
    if not task["Instances"]:
        bad.report(path, "task has no instances")
        return None
    return task


def task_examples(spec: SourceSpec, name: str, bad: BadRecords, seed: int) -> Iterator[Example]:
    path = task_path(spec, name)
    task = load_task(path, bad)
    if task is None:
        return
    instances = list(enumerate(task["Instances"]))
    if spec.is_train:
        random.Random(f"{seed}:{name}").shuffle(instances)
    positives = task.get("Positive Examples") or []
    if spec.format in ("def_pos", "concat") and len(positives) < spec.num_pos:
        log.warning("sni: %s has %d positive examples, fewer than num_pos=%d",
                    path, len(positives), spec.num_pos)
    kept = 0
    for i, inst in instances:
        if kept == spec.max_per_task:
            return
        outputs = inst.get("output") if isinstance(inst, dict) else None
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not outputs:
            bad.report(path, f"Instances[{i}]: needs a string 'input' and a non-empty 'output'")
            continue
        hyper, text = format_instance(spec, task, inst["input"])
        kept += 1
        yield Example(task=name, hyper=hyper, input=text, target=outputs[0], references=list(outputs))


def format_instance(spec: SourceSpec, task: dict, input_text: str) -> tuple[str, str]:
    definition, positives = task["Definition"], task.get("Positive Examples") or []
    if spec.format == "def":
        return formats.sni_def(definition, input_text)
    if spec.format == "def_pos":
        return formats.sni_def_pos(definition, positives, spec.num_pos, input_text)
    if spec.format == "concat":
        return formats.sni_concat(definition, positives, spec.num_pos, input_text)
    return formats.no_instruct(input_text)


def task_streams(spec: SourceSpec, bad: BadRecords, seed: int) -> list[tuple[str, Iterator[Example]]]:
    return [(name, task_examples(spec, name, bad, seed)) for name in split_tasks(spec)]


def sni_categories(tasks_dir: str | Path, tasks: Iterable[str]) -> dict[str, str]:
    """Task name -> category, from the `Categories` field of the SNI task files (`<task>.json`)."""
    out = {}
    for task in tasks:
        path = Path(tasks_dir) / f"{task}.json"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                cats = json.load(f).get("Categories") or []
            if cats:
                out[task] = cats[0]
    return out
