"""A synthetic instruction suite the demo trains on offline, in the SNI and C4 file formats.

Every input looks alike: 3 to 6 items drawn from animals, colours and digits ("fox 3 red owl").
The instruction alone decides the output. A task asks one kind of question about one
category of items:

    count   how many of them there are             "2"
    first   the first one ("none" if there is none) "fox"
    last    the last one                            "owl"
    exists  whether there is one                    "yes" / "no"
    keep    the list with only them, in order       "fox owl"
    remove  the list without them, in order         "3 red"

over the categories animals, colours, numbers (and "items", all of them, for count, first and
last), each in two phrasings ("Count the colours in the list." / "How many colours does the
list hold?"). Every task is one (kind, category, phrasing).

Why questions and not, say, list reversal: answers are found by looking items up, not by
moving them around, which the demo's 128-wide T5 learns in a few hundred steps on 2 cores
(an earlier suite of list rearrangements left it at a training loss of 1.6 after 1,500 steps).

The split is by (kind, category) CELL and fixed, so a held-out task is a question never seen
in training, built from a seen kind and a seen category: HELD_OUT holds one cell per kind,
each category twice ("How many numbers ..." is held out while "How many animals ..." and
"Is there a number ..." are trained on). Train tasks are drawn from the other cells (every
cell in its first phrasing, then the rest), test tasks from the held-out ones.

The pretraining text (C4 json.gz lines) is demonstrations of TRAIN tasks only, written as
prose, so pretraining never shows a held-out question. Everything is deterministic for a
seed (gzip written with mtime 0: same seed, same bytes).
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines import formats

SPLIT = "synthetic"
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen")
COLOURS = ("red", "blue", "green", "pink", "gold", "gray")
DIGITS = tuple(str(d) for d in range(10))
# category -> (singular with its article, plural, membership test)
CATEGORIES: dict[str, tuple[str, str, Callable[[str], bool]]] = {
    "animals": ("an animal", "animals", ANIMALS.__contains__),
    "colours": ("a colour", "colours", COLOURS.__contains__),
    "numbers": ("a number", "numbers", str.isdigit),
    "items": ("an item", "items", lambda item: True),
}


def _first(items: list[str]) -> str:
    return items[0] if items else "none"


def _last(items: list[str]) -> str:
    return items[-1] if items else "none"


@dataclass(frozen=True)
class Kind:
    """A kind of question: its phrasings ({a}: "an animal", {one}: "animal", {all}: "animals"),
    the categories it is asked about, and its answer from the items of that category and the rest."""

    name: str
    phrasings: tuple[str, str]
    categories: tuple[str, ...]
    answer: Callable[[list[str], list[str]], str]


THREE = ("animals", "colours", "numbers")
KINDS = (
    Kind("count", ("Count the {all} in the list.", "How many {all} does the list hold?"),
         (*THREE, "items"), lambda hits, rest: str(len(hits))),
    Kind("first", ("Write the first {one} of the list.", "Which {one} comes first?"),
         (*THREE, "items"), lambda hits, rest: _first(hits)),
    Kind("last", ("Write the last {one} of the list.", "Which {one} comes last?"),
         (*THREE, "items"), lambda hits, rest: _last(hits)),
    Kind("exists", ("Is there {a} in the list?", "Does the list contain {a}?"),
         THREE, lambda hits, rest: "yes" if hits else "no"),
    Kind("keep", ("Keep only the {all}.", "List the {all} and nothing else."),
         THREE, lambda hits, rest: " ".join(hits) or "none"),
    Kind("remove", ("Remove the {all}.", "Delete every {one} from the list."),
         THREE, lambda hits, rest: " ".join(rest) or "none"),
)
# One held-out (kind, category) cell per kind, each category twice.
HELD_OUT = {("count", "numbers"), ("first", "colours"), ("last", "animals"),
            ("exists", "colours"), ("keep", "numbers"), ("remove", "animals")}


@dataclass(frozen=True)
class Task:
    kind: Kind
    category: str
    phrasing: int  # index into kind.phrasings

    @property
    def name(self) -> str:
        return f"synthetic_{self.kind.name}_{self.category}_{self.phrasing + 1}"

    @property
    def definition(self) -> str:
        a, plural, _ = CATEGORIES[self.category]
        return self.kind.phrasings[self.phrasing].format(a=a, one=a.split()[1], all=plural)

    def run(self, items: list[str]) -> str:
        member = CATEGORIES[self.category][2]
        return self.kind.answer([x for x in items if member(x)], [x for x in items if not member(x)])

    @property
    def held_out(self) -> bool:
        return (self.kind.name, self.category) in HELD_OUT


def catalogue() -> list[Task]:
    """Every task, first phrasings first."""
    return [Task(kind, category, p) for p in range(2) for kind in KINDS for category in kind.categories]


def split_tasks(num_train_tasks: int, num_test_tasks: int, seed: int) -> tuple[list[Task], list[Task]]:
    rng = random.Random(seed)
    tasks = catalogue()
    held_out = [t for t in tasks if t.held_out]
    seen = [t for t in tasks if not t.held_out]
    firsts = [t for t in seen if t.phrasing == 0]
    if not len(firsts) <= num_train_tasks <= len(seen):
        raise ValueError(f"synthetic: num_train_tasks must be in [{len(firsts)}, {len(seen)}] "
                         "(every seen question in its first phrasing, plus second phrasings)")
    if not 2 <= num_test_tasks <= len(held_out):
        raise ValueError(f"synthetic: num_test_tasks must be in [2, {len(held_out)}]")
    train = firsts + rng.sample([t for t in seen if t.phrasing > 0], num_train_tasks - len(firsts))
    return train, rng.sample(held_out, num_test_tasks)


def random_items(rng: random.Random) -> list[str]:
    pool = ANIMALS + COLOURS + DIGITS
    return [rng.choice(pool) for _ in range(rng.randint(3, 6))]


def task_json(task: Task, rng: random.Random, num_instances: int) -> dict:
    """The task in the SNI task-file format (two positive examples, then the instances)."""
    def example(i: int) -> dict:
        items = random_items(rng)
        return {"id": f"{task.name}-{i}", "input": " ".join(items), "output": [task.run(items)]}

    positives = [example(-1 - i) for i in range(2)]
    return {
        "Contributors": ["pipelines.synthetic"], "Source": ["synthetic"],
        "Definition": [task.definition],
        "Positive Examples": [{"input": p["input"], "output": p["output"][0],
                               "explanation": "Follow the instruction."} for p in positives],
        "Negative Examples": [],
        "Instances": [example(i) for i in range(num_instances)],
    }


def pretraining_doc(tasks: list[Task], rng: random.Random, sentences: int = 8) -> str:
    lines = []
    for _ in range(sentences):
        task, items = rng.choice(tasks), random_items(rng)
        lines.append(f"{task.definition} For {' '.join(items)} the answer is {task.run(items)}.")
    return " ".join(lines)


@dataclass(frozen=True)
class Suite:
    """Where write_suite put things, and ready-made source specs (dicts) for configs."""

    root: str
    train_tasks: list[str]
    test_tasks: list[str]

    @property
    def sni_path(self) -> str:
        return str(Path(self.root) / "sni")

    @property
    def c4_path(self) -> str:
        return str(Path(self.root) / "c4" / "*.json.gz")

    def sni_spec(self, format: str = "def", part: str = "train", **extra) -> dict:
        return {"kind": "sni", "path": self.sni_path, "split": SPLIT, "format": format, "part": part, **extra}

    def c4_spec(self, **extra) -> dict:
        return {"kind": "c4", "path": self.c4_path, **extra}

    def texts(self) -> Iterator[str]:
        """All text of the suite as the models read it (each task once in the Tk-Instruct format,
        which holds every format's fixed words, then instances and pretraining), for train_tokenizer."""
        for path in sorted((Path(self.sni_path) / "tasks").glob("*.json")):
            task = json.loads(path.read_text())
            first = task["Instances"][0]["input"]
            yield formats.sni_concat(task["Definition"][0], task["Positive Examples"], 2, first)[1]
            for inst in task["Instances"]:
                yield inst["input"]
                yield from inst["output"]
        with gzip.open(Path(self.root) / "c4" / "synthetic-pretrain.json.gz", "rt") as f:
            for line in f:
                yield json.loads(line)["text"]


def write_suite(out_dir: str | Path, *, num_train_tasks: int = 30, num_test_tasks: int = 12,
                instances_per_task: int = 100, num_pretrain_docs: int = 500, seed: int = 0) -> Suite:
    """Write the suite: sni/tasks/*.json, sni/splits/synthetic/{train,test}_tasks.txt and
    c4/synthetic-pretrain.json.gz under out_dir."""
    out = Path(out_dir)
    (out / "sni" / "tasks").mkdir(parents=True, exist_ok=True)
    (out / "sni" / "splits" / SPLIT).mkdir(parents=True, exist_ok=True)
    (out / "c4").mkdir(parents=True, exist_ok=True)
    train, test = split_tasks(num_train_tasks, num_test_tasks, seed)
    rng = random.Random(seed + 1)
    for task in train + test:
        data = task_json(task, rng, instances_per_task)
        (out / "sni" / "tasks" / f"{task.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    for part, tasks in (("train", train), ("test", test)):
        (out / "sni" / "splits" / SPLIT / f"{part}_tasks.txt").write_text("".join(f"{t.name}\n" for t in tasks))
    with open(out / "c4" / "synthetic-pretrain.json.gz", "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for i in range(num_pretrain_docs):
            doc = {"text": pretraining_doc(train, rng), "timestamp": "2019-04-25T00:00:00Z",
                   "url": f"synthetic://pretrain/{i}"}
            f.write((json.dumps(doc) + "\n").encode())
    return Suite(str(out), [t.name for t in train], [t.name for t in test])
