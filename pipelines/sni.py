"""Super-Natural Instructions: task JSON files and split lists, in the checkout's own layout.

A checkout holds `tasks/<task>.json` (Definition, Positive Examples, Instances[{id, input,
output[]}], ...) and `splits/<split>/{train,test}_tasks.txt` (one task name a line). Each task
gives at most `max_per_task` instances: a seeded shuffle for the train part, the first N for
test (as the paper and Tk-Instruct do). The target is the first output; all outputs are kept as
references for ROUGE-L. The strings are those of pipelines.formats; what does not fit the
lengths is dropped there, before the tokenisation stage truncates anything.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Iterator

from pipelines import files, formats
from pipelines.bad_records import BadRecords
from pipelines.budget import TokenBudget
from pipelines.example import Example, TaskStream
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


def task_examples(spec: SourceSpec, name: str, budget: TokenBudget, bad: BadRecords, seed: int) -> TaskStream:
    """The task's examples for a pass: a seeded shuffle of its instances (train part; the pass's
    seed, so every pass has its own order), or the first N in file order (test part). The
    target is a seeded choice among the instance's outputs for training, as ni_registry.py
    draws it (`random_gen.choice`), and the first output for evaluation (its loss stays the
    same from run to run; ROUGE-L reads every output). The train part reads the file here, to
    know its size (and keeps only the instances it will give); the test part when first drawn."""
    if not spec.is_train:
        return TaskStream(lambda k: _read_when_drawn(spec, name, budget, bad, seed, k))
    task, kept = _selected(spec, name, bad, seed)
    return TaskStream(lambda k: _examples(spec, name, task, kept[k:], budget), size=len(kept))


def _read_when_drawn(spec: SourceSpec, name: str, budget: TokenBudget, bad: BadRecords,
                     seed: int, start: int) -> Iterator[Example]:
    task, kept = _selected(spec, name, bad, seed)
    yield from _examples(spec, name, task, kept[start:], budget)


def _selected(spec: SourceSpec, name: str, bad: BadRecords, seed: int) -> tuple[dict, list[tuple[str, list[str], str]]]:
    """(the task, its (input, outputs, target) for the pass); no instances for a bad file."""
    path = task_path(spec, name)
    task = load_task(path, bad)
    if task is None:
        return {}, []
    instances = list(enumerate(task["Instances"]))
    rng = random.Random(f"{seed}:{name}")
    if spec.is_train:
        rng.shuffle(instances)
    kept = []
    for i, inst in instances:
        if len(kept) == spec.max_per_task:
            break
        outputs = inst.get("output") if isinstance(inst, dict) else None
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) or not outputs:
            bad.report(path, f"Instances[{i}]: needs a string 'input' and a non-empty 'output'")
            continue
        kept.append((inst["input"], list(outputs), rng.choice(outputs) if spec.is_train else outputs[0]))
    positives = task.get("Positive Examples") or []
    if spec.format in ("def_pos", "concat") and len(positives) < spec.num_pos:
        log.warning("sni: %s has %d positive examples, fewer than num_pos=%d",
                    path, len(positives), spec.num_pos)
    return {"Definition": task["Definition"], "Positive Examples": positives}, kept


def _examples(spec: SourceSpec, name: str, task: dict, kept: list[tuple[str, list[str], str]],
              budget: TokenBudget) -> Iterator[Example]:
    if not kept:
        return
    hyper = task_hyper(spec, task, budget)
    for input_text, outputs, target in kept:
        yield Example(task=name, hyper=hyper, input=model_input(spec, task, input_text, budget),
                      target=target, references=outputs)


def task_hyper(spec: SourceSpec, task: dict, budget: TokenBudget) -> str:
    """The hypernetwork's text, one per task."""
    if spec.format == "def":
        return formats.sni_def_hyper(task["Definition"])
    if spec.format == "def_pos":
        return formats.sni_def_pos_hyper(task["Definition"], task.get("Positive Examples") or [],
                                         spec.num_pos, budget.fits_hyper)
    if spec.format == "concat" and budget.causal:
        return formats.sni_concat_instruction(task["Definition"], task.get("Positive Examples") or [],
                                              spec.num_pos, budget.fits_hyper)
    return ""


def model_input(spec: SourceSpec, task: dict, input_text: str, budget: TokenBudget) -> str | list[int]:
    if spec.format != "concat":
        return formats.no_instruct(input_text)[1]
    if budget.causal:
        return causal_instance(input_text, budget)
    return tk_instruct_input(task, spec.num_pos, input_text, budget)


def causal_instance(input_text: str, budget: TokenBudget) -> str | list[int]:
    """A decoder-only concat model's input: Tk-Instruct's instance and output cue, whose
    instruction part is the task's prefix (`task_hyper`). Too long: token ids, the instance cut
    so that the cue stays (as tk_instruct_input keeps it)."""
    prompt = formats.sni_concat_prompt(input_text)
    if budget.fits_input(prompt):
        return prompt
    _, instance, cue = formats.sni_concat_parts("", [], 0, input_text)
    instance_ids, cue_ids = (budget.tokenizer.encode(p, eos=False) for p in (instance, cue.rstrip()))
    return instance_ids[:budget.max_input_len - len(cue_ids)] + cue_ids


def tk_instruct_input(task: dict, k: int, input_text: str, budget: TokenBudget) -> str | list[int]:
    """The Tk-Instruct string with the examples that fit (ni_collator.py). When the definition and
    the instance alone are too long, token ids: the reference keeps the first max_input_len
    tokens there, which can cut the instance and `Output:` away; we keep its head too, but the
    output cue always stays and the instance keeps at least half the room (or all of itself).
    Kept on purpose: an input without its instance cannot be answered, and the difference
    touches only the few SNI instances whose definition fills the whole input."""
    parts = formats.sni_concat_parts(task["Definition"], task.get("Positive Examples") or [], k,
                                     input_text, budget.fits_input)
    text = "".join(parts).strip()
    if budget.fits_input(text):
        return text
    # The parts join at whitespace, where SentencePiece splits anyway: their ids concatenate.
    head, instance, cue = (budget.tokenizer.encode(p, eos=False) for p in parts)
    room = budget.max_input_len - 1 - len(cue)
    head = head[:max(room // 2, room - len(instance))]
    return head + instance[:room - len(head)] + cue + [budget.tokenizer.eos_id]


def task_streams(spec: SourceSpec, budget: TokenBudget, bad: BadRecords,
                 seed: int) -> list[tuple[str, TaskStream]]:
    return [(name, task_examples(spec, name, budget, bad, seed)) for name in split_tasks(spec)]


def sni_categories(tasks_dir: str | os.PathLike, tasks: Iterable[str]) -> dict[str, str]:
    """Task name -> its first `Categories` entry, from `<tasks_dir>/<task>.json` (a task without a
    file or a category is left out; a broken file is an error naming it)."""
    out = {}
    for name in tasks:
        path = files.join(str(tasks_dir), f"{name}.json")
        task = load_task(path, BadRecords()) if files.exists(path) else None
        if task and task.get("Categories"):
            out[name] = task["Categories"][0]
    return out
