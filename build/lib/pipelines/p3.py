"""P3 (the T0 mixture): promptsource templates applied to raw records, or pre-rendered files.

`p3`: the records of `path` (jsonl, one file or a glob; SuperGLUE's own layout is mapped to
the Hugging Face fields) rendered with every template of `templates/<dataset>/templates.yaml`.
Each template is a task, `<dataset>/<template name>`. A template that does not apply to a
record (it renders an empty prompt or target, e.g. COPA templates written for one question
type, or an unlabelled record) yields nothing for it; those are counted and logged per
template. A template that raises while rendering is a bad record naming task and template.

`p3_rendered`: `{prompt, completion}` lines (completion ending in `<|endoftext|>`), one file
per dataset and template, `<dataset>_<template>.jsonl[.gz]`. With `templates` given, the
template whose normalised `<dataset>_<subset>_<name>` equals the file name supplies the
hypernetwork text; without it the hypernetwork reads the file's task name in words.

Sampling cap (T0): a dataset with more than `example_cap` examples contributes
example_cap / number-of-templates examples per template (the first ones, in file order).
Records are held in memory per dataset (each template renders all of them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import jinja2

from pipelines import files, formats
from pipelines.bad_records import BadRecords
from pipelines.example import Example
from pipelines.p3_templates import Template, load_templates, to_hf_fields
from pipelines.spec import SourceSpec, SpecError

log = logging.getLogger(__name__)
END_OF_TEXT = "<|endoftext|>"


def capped(examples: Iterable[Example], num_templates: int, cap: int) -> Iterator[Example]:
    """T0's rule, streaming: the first cap // num_templates examples if the dataset has more
    than `cap`, else all (the rest is held until the size is known)."""
    limit, held = cap // num_templates, []
    for i, ex in enumerate(examples):
        if i < limit:
            yield ex
        elif i < cap:
            held.append(ex)
        else:
            return
    yield from held


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


def read_records(spec: SourceSpec, bad: BadRecords) -> list[dict]:
    paths = files.expand(spec.path)
    if not paths:
        raise SpecError(f"p3: no files match {spec.path}")
    records = []
    for path in paths:
        for lineno, record in files.read_json_objects(path, bad):
            try:
                records.append(to_hf_fields(spec.dataset, record))
            except (KeyError, ValueError) as e:
                bad.report(path, str(e).strip('"'), lineno)
    return records


def template_examples(spec: SourceSpec, template: Template, records: list[dict], bad: BadRecords,
                      seed: int) -> Iterator[Example]:
    task = f"{spec.dataset}/{template.name}"
    masked = template.masked()
    not_applicable = 0
    for i, record in enumerate(records):
        try:
            prompt, target, choices = template.render(record, seed=seed * 1_000_003 + i)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            bad.report(f"task {task} (template {template.id})", f"record {i}: template failed to render: {e}")
            continue
        if not prompt or not target:
            not_applicable += 1
            continue
        if spec.format == "joint":
            hyper, text = formats.p3_joint(masked, prompt)
        elif spec.format == "split":
            hyper, text = formats.p3_split(masked, [(f, str(record[f])) for f in template.fields_used(record)])
        else:
            hyper, text = formats.p3_concat(prompt)
        yield Example(task=task, hyper=hyper, input=text, target=target, references=[target],
                      answer_choices=choices, answer_index=choices.index(target) if target in choices else -1)
    if not_applicable:
        log.info("p3: template %r of %s does not apply to %d of %d records", template.name,
                 spec.dataset, not_applicable, len(records))


def raw_task_streams(spec: SourceSpec, bad: BadRecords, seed: int) -> list[tuple[str, Iterator[Example]]]:
    templates = read_templates(templates_file(spec), bad)
    records = read_records(spec, bad)
    return [(f"{spec.dataset}/{t.name}",
             capped(template_examples(spec, t, records, bad, seed), len(templates), spec.example_cap))
            for t in templates]


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def template_index(templates_dir: str, bad: BadRecords) -> dict[str, tuple[Template, int]]:
    """normalised `<dataset>_<subset>_<template name>` -> (template, templates in its file)."""
    index = {}
    for path in files.expand(files.join(templates_dir, "**", "templates.yaml")):
        dataset = path[len(templates_dir.rstrip("/")) + 1:].rsplit("/", 1)[0]
        templates = read_templates(path, bad)
        for t in templates:
            index[_normalise(f"{dataset}_{t.name}")] = (t, len(templates))
    return index


def rendered_examples(spec: SourceSpec, path: str, hyper: str, bad: BadRecords) -> Iterator[Example]:
    task = path.rsplit("/", 1)[-1].split(".jsonl")[0]
    for lineno, row in files.read_json_objects(path, bad):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            bad.report(path, "needs string 'prompt' and 'completion'", lineno)
            continue
        target = row["completion"].removesuffix(END_OF_TEXT).strip()
        if not row["prompt"].strip() or not target:
            bad.report(path, "empty prompt or completion", lineno)
            continue
        _, text = formats.p3_concat(row["prompt"])
        yield Example(task=task, hyper=hyper if spec.format == "joint" else "", input=text,
                      target=target, references=[target])


def rendered_task_streams(spec: SourceSpec, bad: BadRecords, seed: int) -> list[tuple[str, Iterator[Example]]]:
    paths = files.expand(spec.path)
    if not paths:
        raise SpecError(f"p3_rendered: no files match {spec.path}")
    index = template_index(spec.templates, bad) if spec.templates else {}
    streams = []
    for path in paths:
        task = path.rsplit("/", 1)[-1].split(".jsonl")[0]
        template, num_templates = index.get(_normalise(task), (None, 1))
        if spec.templates and template is None:
            log.warning("p3_rendered: no template in %s matches %s; its hypernetwork input is the task name",
                        spec.templates, path)
        hyper = template.masked() if template else task.replace("_", " ")
        streams.append((task, capped(rendered_examples(spec, path, hyper, bad), num_templates, spec.example_cap)))
    return streams


def task_streams(spec: SourceSpec, bad: BadRecords, seed: int) -> list[tuple[str, Iterator[Example]]]:
    if spec.kind == "p3":
        return raw_task_streams(spec, bad, seed)
    return rendered_task_streams(spec, bad, seed)
