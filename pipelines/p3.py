"""P3 (the T0 mixture): promptsource templates applied to raw records, or pre-rendered files.

`p3`: the records of `path` (jsonl, one file or a glob; SuperGLUE's own layout is mapped to
the Hugging Face fields) rendered with every template of `templates/<dataset>/templates.yaml`.
Each template is a task, `<dataset>/<template name>`; the test part (evaluation) keeps T0's
scored ones only: `original_task` templates with answer choices (scored_templates). A template that does not apply to a
record (it renders an empty prompt or target, e.g. COPA templates written for one question
type, or an unlabelled record) yields nothing for it; those are counted and logged per
template. A template that raises while rendering is a bad record naming task and template.

`p3_rendered`: `{prompt, completion}` lines (completion ending in `<|endoftext|>`), one file
per dataset and template, `<dataset>_<template>.jsonl[.gz]`. With `templates` given, the
template whose normalised `<dataset>_<subset>_<name>` equals the file name supplies the
hypernetwork text; without it the hypernetwork reads the file's task name in words.

The hypernetwork's text ('joint', 'split'): with `edited_prompts` (a copy of the reference's
seqio_tasks/all_edited_prompts.txt, ~400 hand-edited prompts of the T0 datasets' templates) the
template's edited prompt with every `[FIELD]` replaced by `[MASK]`, as the reference's
load_prewritten_prompts / replace_keys build it; a template the file lacks falls back to the
automatic masking of p3_templates.py, counted in one warning per source. Without the file,
every template is masked automatically (`[field]` placeholders, Jinja logic removed).

No EOS after P3's inputs and hypernetwork inputs (t0_tasks.py: add_eos=False on both; the
targets keep theirs).

Sampling cap and order (T0: t0_tasks.py `mixture_cap`, all_t0_tasks.py's rates): a dataset with
more than `example_cap` records contributes example_cap / number-of-templates per template, else
all of them; that count is also the template's size in the mixture (pipelines/dataset.py). In
the train part each template's records come in a seeded permutation of the pass (the
reference's 50k shuffle buffer, reshuffled each pass; our readers can index the records, so the
whole dataset is shuffled) and the cap keeps the head of it: a fresh random sample each pass.
The test part keeps the first records in file order. A record the template does not apply to
still takes its slot in the mixture (the reference's rate counts the dataset's records, not the
rendered ones). Records are held in memory per dataset (each template renders all of them);
p3_rendered holds a file's rows in memory for the train part (it must count and shuffle them).

Few-shot (`num_shots: k`, the paper's Table 3; reference seqio_tasks/few_shot.py with the
arguments of my_t0_tasks.py): every example gets k examples of the same template, rendered in
the same format, drawn as seqio's FewshotDataSource draws them (the train records in a seeded
shuffle, reshuffled each pass, cut into consecutive groups of k; an example can be among its
own shots there too). Shots are pruned from the end until their prompt and target tokens fit
in `max_input_len - 64` minus the example's input (the reference's 960 of 1024, "saving 64 for
separators, like FLAN"), measured against the model input even when the shots go to the
hypernetwork, as there; a hypernetwork input still longer than max_hyper_len loses its end in
the tokenisation stage, as seqio's trimming does.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator

import jinja2
import numpy as np

from pipelines import files, formats
from pipelines.bad_records import BadRecords
from pipelines.budget import TokenBudget
from pipelines.example import Example, TaskStream
from pipelines.p3_templates import Template, load_templates, to_hf_fields
from pipelines.spec import SourceSpec, SpecError

log = logging.getLogger(__name__)
END_OF_TEXT = "<|endoftext|>"
SHOT_SEPARATOR_TOKENS = 64  # few_shot.py's max_input_length = 1024 - 64
RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError)


def capped(examples: Iterable[Example], num_templates: int, cap: int) -> Iterator[Example]:
    """T0's cap in file order, streaming (the test part of p3_rendered, whose size is not known
    before reading): the first cap // num_templates examples if the file has more than `cap`,
    else all (the rest is held until the size is known)."""
    limit, held = cap // num_templates, []
    for i, ex in enumerate(examples):
        if i < limit:
            yield ex
        elif i < cap:
            held.append(ex)
        else:
            return
    yield from held


def planned(num_records: int, num_templates: int, cap: int, seed: int | str, train: bool) -> np.ndarray:
    """The record indices a template gives in a pass (module docstring: T0's cap and order)."""
    limit = cap // num_templates if num_records > cap else num_records
    if not train:
        return np.arange(limit)
    rng = np.random.default_rng(random.Random(f"{seed}:order").getrandbits(64))
    return rng.permutation(num_records)[:limit]


def templates_file(spec: SourceSpec) -> str:
    return files.join(spec.templates, *spec.dataset.split("/"), "templates.yaml")


def read_templates(path: str, bad: BadRecords) -> list[Template]:
    if not files.exists(path):
        raise SpecError(f"p3: template file not found: {path}")
    text = files.read_text(path, bad)
    if text is None:
        return []
    try:
        return load_templates(path, text)
    except ValueError as e:
        bad.report(path, str(e))
        return []


def read_records(spec: SourceSpec, pattern: str, bad: BadRecords) -> list[dict]:
    paths = files.expand(pattern)
    if not paths:
        raise SpecError(f"p3: no files match {pattern}")
    records = []
    for path in paths:
        for lineno, _, record in files.read_json_objects(path, bad):
            try:
                records.append(to_hf_fields(spec.dataset, record))
            except (KeyError, ValueError) as e:
                bad.report(path, str(e).strip('"'), lineno)
    return records


EDITED_SEPARATOR = "****************************"


def read_edited_prompts(path: str, bad: BadRecords) -> dict[str, str]:
    """all_edited_prompts.txt: `dataset_subset\t||||\ttemplate\t||||\tprompt` entries separated
    by a line of 28 stars -> {lower-cased `dataset_subset_template`: the prompt, [FIELD]s masked}
    (utils.py load_prewritten_prompts and replace_keys)."""
    if not files.exists(path):
        raise SpecError(f"p3: edited_prompts file not found: {path}")
    text = files.read_text(path, bad) or ""
    entries = [entry.strip().split("\t||||\t") for entry in text.split(EDITED_SEPARATOR)]
    return {f"{e[0]}_{e[1]}".lower().strip(): re.sub(r"\[[A-Za-z0-9_]+\]", "[MASK]", e[2])
            for e in entries if len(e) > 2}


def edited_key(dataset: str, template_name: str) -> str:
    """The reference's task name (utils.py get_task_name, task_clean), lower-cased."""
    return re.sub(r"[^\w\d\._]+", "_", f"{dataset.replace('/', '_')}_{template_name}").lower()


class HyperTexts:
    """The hypernetwork's text of each template of a source (module docstring)."""

    def __init__(self, spec: SourceSpec, bad: BadRecords):
        self.spec = spec
        self.edited = read_edited_prompts(spec.edited_prompts, bad) if spec.edited_prompts else None
        self.missing: list[str] = []

    def of(self, dataset: str, template: Template) -> str:
        if self.edited is None:
            return template.masked()
        key = edited_key(dataset, template.name)
        # anli's rounds are tasks of their own there; the prompts are the same for every round.
        text = self.edited.get(key, self.edited.get(f"{key}_r1"))
        if text is None:
            self.missing.append(template.name)
            return template.masked()
        return text

    def warn_missing(self, where: str) -> None:
        if self.missing:
            log.warning("p3: %d template(s) of %s have no prompt in %s; their hypernetwork reads the "
                        "automatically masked template: %s", len(self.missing), where,
                        self.spec.edited_prompts, ", ".join(self.missing[:5]))


def render(spec: SourceSpec, template: Template, record: dict, seed: int,
           hyper: str | None = None) -> tuple[str, str, str, list[str]] | None:
    """(hyper, model input, target, answer choices) of the record in the spec's format; None when
    the template does not apply to it. `hyper` is the hypernetwork's text of the template (the
    automatically masked template when None). Raises RENDER_ERRORS."""
    prompt, target, choices = template.render(record, seed=seed)
    if not prompt or not target:
        return None
    hyper = template.masked() if hyper is None else hyper
    if spec.format == "joint":
        hyper, text = formats.p3_joint(hyper, prompt)
    elif spec.format == "split":
        hyper, text = formats.p3_split(hyper, [(f, str(record[f])) for f in template.fields_used(record)])
    else:
        hyper, text = formats.p3_concat(prompt)
    return hyper, text, target, choices


def _render_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def template_examples(spec: SourceSpec, template: Template, records: list[dict], order: np.ndarray,
                      shot_records: list[dict], budget: TokenBudget, bad: BadRecords, seed: int,
                      instruction: str | None = None) -> Iterator[Example | None]:
    """One slot per index of `order`: the record rendered, or None where it gives no example.
    `instruction`: the hypernetwork's text of the template (render)."""
    task = f"{spec.dataset}/{template.name}"
    groups = shot_groups(spec, template, shot_records, bad, seed) if spec.num_shots else None
    not_applicable = 0
    for i in map(int, order):
        try:
            rendered = render(spec, template, records[i], _render_seed(seed, i), instruction)
        except RENDER_ERRORS as e:
            bad.report(f"task {task} (template {template.id})", f"record {i}: template failed to render: {e}")
            yield None
            continue
        if rendered is None:
            not_applicable += 1
            yield None
            continue
        hyper, text, target, choices = rendered
        if groups is not None:
            shots = fitting_shots(next(groups), text, budget)
            hyper, text = formats.p3_few_shot(shots, hyper, text, spec.format)
        yield Example(task=task, hyper=hyper, input=text, target=target, references=[target],
                      answer_choices=choices, answer_index=choices.index(target) if target in choices else -1,
                      input_eos=False)
    if not_applicable:
        log.info("p3: template %r of %s does not apply to %d of %d records", template.name,
                 spec.dataset, not_applicable, len(order))


def shot_groups(spec: SourceSpec, template: Template, records: list[dict], bad: BadRecords,
                seed: int) -> Iterator[list[tuple[str, str]]]:
    """Endless groups of num_shots (model input, target) pairs of the template (module docstring).
    A record renders as it does as an example (same seed for the same index of the same file)."""
    task = f"{spec.dataset}/{template.name}"
    rng = np.random.default_rng(random.Random(f"{seed}:{task}:shots").getrandbits(64))
    group: list[tuple[str, str]] = []
    while True:
        applicable = 0
        for j in rng.permutation(len(records)):
            try:
                rendered = render(spec, template, records[j], _render_seed(seed, int(j)))
            except RENDER_ERRORS as e:
                bad.report(f"task {task} (template {template.id}) shots", f"record {j}: template failed to render: {e}")
                continue
            if rendered is None:
                continue
            applicable += 1
            group.append((rendered[1], rendered[2]))
            if len(group) == spec.num_shots:
                yield group
                group = []
        if not applicable:
            log.warning("p3: no shot record renders with template %r of %s; its examples get no shots",
                        template.name, spec.dataset)
            while True:
                yield []


def fitting_shots(shots: list[tuple[str, str]], text: str, budget: TokenBudget) -> list[tuple[str, str]]:
    """The leading shots whose prompt and target tokens fit beside the example's input."""
    room = budget.max_input_len - SHOT_SEPARATOR_TOKENS - budget.count(text, eos=False)
    kept = []
    for prompt, target in shots:
        room -= budget.count(prompt, eos=False) + budget.count(target, eos=False)
        if room < 0:
            break
        kept.append((prompt, target))
    return kept


def raw_task_streams(spec: SourceSpec, budget: TokenBudget, bad: BadRecords,
                     seed: int) -> list[tuple[str, TaskStream]]:
    templates = read_templates(templates_file(spec), bad)
    records = read_records(spec, spec.path, bad)
    shot_records = read_records(spec, spec.shots_path, bad) if spec.shots_path else records
    texts = HyperTexts(spec, bad)
    streams = []
    for t in templates if spec.is_train else scored_templates(spec, templates):
        task = f"{spec.dataset}/{t.name}"
        order = planned(len(records), len(templates), spec.example_cap, f"{seed}:{task}", spec.is_train)
        slots = _template_slots(spec, t, records, order, shot_records, budget, bad, seed,
                                texts.of(spec.dataset, t))
        streams.append((task, TaskStream(slots, size=len(order) if spec.is_train else None)))
    texts.warn_missing(spec.dataset)
    return streams


def _template_slots(spec: SourceSpec, template: Template, records: list[dict], order: np.ndarray,
                    shot_records: list[dict], budget: TokenBudget, bad: BadRecords, seed: int,
                    instruction: str) -> Callable[[int], Iterator[Example | None]]:
    """TaskStream.slots_from of a template. Few-shot examples take their shots in turn from one
    endless sequence of groups, whose place depends on how many earlier records rendered: a
    resumed few-shot template renders its earlier slots again (not tokenising them; a record
    that failed to render there is counted again among the skipped)."""
    def slots_from(k: int) -> Iterator[Example | None]:
        if spec.num_shots:
            return itertools.islice(template_examples(spec, template, records, order, shot_records,
                                                      budget, bad, seed, instruction), k, None)
        return template_examples(spec, template, records, order[k:], shot_records, budget, bad,
                                 seed, instruction)
    return slots_from


def scored_templates(spec: SourceSpec, templates: list[Template]) -> list[Template]:
    """The templates evaluation scores: T0's (all_t0_tasks.py `t0_eval_score_eval`: the
    `original_task` prompts, by rank classification over their answer choices)."""
    scored = [t for t in templates if t.metadata.get("original_task") and t.answer_choices]
    if len(scored) < len(templates):
        log.info("p3: %s: evaluating %d of %d templates (original task, with answer choices)",
                 spec.dataset, len(scored), len(templates))
    return scored


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def template_index(templates_dir: str, bad: BadRecords) -> dict[str, tuple[Template, int, str]]:
    """normalised `<dataset>_<subset>_<template name>` -> (template, templates in its file, its
    dataset `<dataset>[/<subset>]`)."""
    index = {}
    for path in files.expand(files.join(templates_dir, "**", "templates.yaml")):
        dataset = path[len(templates_dir.rstrip("/")) + 1:].rsplit("/", 1)[0]
        templates = read_templates(path, bad)
        for t in templates:
            index[_normalise(f"{dataset}_{t.name}")] = (t, len(templates), dataset)
    return index


def rendered_examples(spec: SourceSpec, path: str, hyper: str, bad: BadRecords) -> Iterator[Example]:
    task = path.rsplit("/", 1)[-1].split(".jsonl")[0]
    for lineno, _, row in files.read_json_objects(path, bad):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            bad.report(path, "needs string 'prompt' and 'completion'", lineno)
            continue
        target = row["completion"].removesuffix(END_OF_TEXT).strip()
        if not row["prompt"].strip() or not target:
            bad.report(path, "empty prompt or completion", lineno)
            continue
        _, text = formats.p3_concat(row["prompt"])
        yield Example(task=task, hyper=hyper if spec.format == "joint" else "", input=text,
                      target=target, references=[target], input_eos=False)


def rendered_task_streams(spec: SourceSpec, bad: BadRecords, seed: int) -> list[tuple[str, TaskStream]]:
    paths = files.expand(spec.path)
    if not paths:
        raise SpecError(f"p3_rendered: no files match {spec.path}")
    index = template_index(spec.templates, bad) if spec.templates else {}
    texts = HyperTexts(spec, bad)
    streams = []
    for path in paths:
        task = path.rsplit("/", 1)[-1].split(".jsonl")[0]
        template, num_templates, dataset = index.get(_normalise(task), (None, 1, ""))
        if spec.templates and template is None:
            log.warning("p3_rendered: no template in %s matches %s; its hypernetwork input is the task name",
                        spec.templates, path)
        hyper = texts.of(dataset, template) if template else task.replace("_", " ")
        if spec.is_train:
            held = list(rendered_examples(spec, path, hyper, bad))
            order = planned(len(held), num_templates, spec.example_cap, f"{seed}:{task}", train=True)
            streams.append((task, TaskStream(lambda k, held=held, order=order: (held[i] for i in order[k:]),
                                             size=len(order))))
        else:  # read again from the file's start: the test part is not resumed mid-task
            streams.append((task, TaskStream(
                lambda k, path=path, hyper=hyper, n=num_templates: itertools.islice(
                    capped(rendered_examples(spec, path, hyper, bad), n, spec.example_cap), k, None))))
    texts.warn_missing(spec.path)
    return streams


def task_streams(spec: SourceSpec, budget: TokenBudget, bad: BadRecords,
                 seed: int) -> list[tuple[str, TaskStream]]:
    if spec.kind == "p3":
        return raw_task_streams(spec, budget, bad, seed)
    return rendered_task_streams(spec, bad, seed)
