"""promptsource templates, rendered with Jinja2 ourselves (promptsource does not install on
Python 3.11), and the SuperGLUE field mapping.

A template file (`<dataset>/[<subset>/]templates.yaml`) holds `!Template` entries with `jinja`
(prompt `|||` target) and `answer_choices` (`|||`-separated, itself Jinja). Rendering follows
promptsource's `Template.apply`: `answer_choices` is rendered first and passed in as a list,
`|||` inside field values is protected, parts are stripped, and the filters `choice`,
`most_frequent` and `highlight` exist (`choice` draws from a per-example seeded generator).

The hypernetwork's view of a template ('joint' / 'split' formats) is static, one text per
template: the prompt side with every `{{ expression }}` replaced by `[field]` (the first name
the expression uses) and Jinja statements removed.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jinja2
import yaml

PIPE = "|||"
_PIPE_ESCAPE = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource's placeholder for ||| in fields
_EXPR = re.compile(r"{{-?(.*?)-?}}", re.S)
_STMT = re.compile(r"{%.*?%}|{#.*?#}", re.S)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYWORDS = {"not", "and", "or", "if", "else", "in", "is", "true", "false", "none", "loop"}


class _TemplateLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # the C loader is ~10x faster
    """safe_load refuses promptsource's !Template / !TemplateMetadata tags: map them to dicts."""


for _tag in ("!Template", "!TemplateMetadata"):
    _TemplateLoader.add_constructor(_tag, lambda loader, node: loader.construct_mapping(node, deep=True))


@dataclass(frozen=True)
class Template:
    id: str
    name: str
    jinja: str
    answer_choices: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def prompt_source(self) -> str:
        return self.jinja.split(PIPE, 1)[0]

    def masked(self) -> str:
        """The prompt with instance fields masked: the hypernetwork's input."""
        return _masked(self.prompt_source)

    def fields_used(self, record: dict[str, Any]) -> list[str]:
        """Record fields the prompt uses, in order of first use (the 'split' format)."""
        names = [n for expr in _EXPR.findall(self.prompt_source) for n in _NAME.findall(expr)]
        return list(dict.fromkeys(n for n in names if n in record and n != "answer_choices"))

    def render(self, record: dict[str, Any], seed: int = 0) -> tuple[str, str, list[str]]:
        """(prompt, target, answer choices); raises jinja2.TemplateError when it cannot render."""
        safe = {k: v.replace(PIPE, _PIPE_ESCAPE) if isinstance(v, str) else v for k, v in record.items()}
        safe[_RNG] = random.Random(seed)
        choices = []
        if self.answer_choices:
            rendered = _compile(self.answer_choices).render(safe)
            choices = [_unescape(c).strip() for c in rendered.split(PIPE)]
        parts = _compile(self.jinja).render({**safe, "answer_choices": choices}).split(PIPE)
        prompt = _unescape(parts[0]).strip()
        target = _unescape(parts[1]).strip() if len(parts) > 1 else ""
        return prompt, target, choices


@functools.lru_cache(maxsize=4096)
def _masked(prompt_source: str) -> str:
    text = _EXPR.sub(lambda m: f"[{_first_name(m.group(1))}]", prompt_source)
    text = _STMT.sub("", text)
    return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()


def _first_name(expr: str) -> str:
    names = [n for n in _NAME.findall(expr) if n.lower() not in _KEYWORDS]
    return names[0] if names else "field"


def _unescape(text: str) -> str:
    return text.replace(_PIPE_ESCAPE, PIPE)


_RNG = "_p3_rng"  # the per-example generator the `choice` filter draws from


@jinja2.pass_context
def _choice(context, items):
    return context[_RNG].choice(items)


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined)
_ENV.filters.update(choice=_choice, most_frequent=lambda items: Counter(items).most_common(1)[0][0],
                    highlight=lambda text: text)


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def load_templates(path: str, text: str) -> list[Template]:
    """The templates of one templates.yaml (its text given; `path` names it in errors)."""
    try:
        data = yaml.load(text, Loader=_TemplateLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not a promptsource template file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict):
        raise ValueError(f"{path}: no 'templates' mapping")
    out = []
    for key, t in data["templates"].items():
        if not isinstance(t, dict) or not isinstance(t.get("jinja"), str):
            raise ValueError(f"{path}: template {key}: no 'jinja' text")
        out.append(Template(id=str(t.get("id", key)), name=str(t.get("name", key)), jinja=t["jinja"],
                            answer_choices=t.get("answer_choices"), metadata=t.get("metadata") or {}))
    return out


# SuperGLUE's own jsonl layout -> the Hugging Face `datasets` fields the templates index.
SUPERGLUE_LABELS = {
    "rte": {"entailment": 0, "not_entailment": 1},
    "cb": {"entailment": 0, "contradiction": 1, "neutral": 2},
}


def to_hf_fields(dataset: str, record: dict[str, Any]) -> dict[str, Any]:
    """Map a SuperGLUE (FewGLUE) record to the HF layout; other datasets pass unchanged.
    Raises KeyError naming an unknown label."""
    parts = dataset.strip("/").split("/")
    if parts[0] != "super_glue" or len(parts) < 2:
        return record
    subset = parts[1].split(".")[0]  # wsc.fixed -> wsc
    out = dict(record)
    label = out.get("label")
    if isinstance(label, bool):
        out["label"] = int(label)
    elif isinstance(label, str):
        labels = SUPERGLUE_LABELS.get(subset, {})
        if label not in labels:
            raise KeyError(f"label {label!r} is not one of {', '.join(labels) or 'the known labels'}")
        out["label"] = labels[label]
    if subset == "wsc" and isinstance(out.get("target"), dict):
        out.update(out.pop("target"))
    return out
