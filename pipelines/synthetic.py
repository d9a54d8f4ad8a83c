"""A synthetic instruction suite the demo trains on offline, in the SNI and C4 file formats.

Every input looks alike: 4 to 6 items drawn from animals, colours and digits
("fox 3 red owl 7"). The instruction alone decides the output. Tasks are compositions of
primitive operations on the item list:

    reverse, sort (alphabetical), upper (capital letters), double (each item twice),
    first k / last k (k = 1..4), keep / remove a category (animals, colours, numbers),
    add n to each number (n = 1..5), and count (final only: the number of items left)

A task is one primitive or an ordered pair of two ("Reverse the order of the items, then
keep the first two items."). An empty result is written "none".

The split is at the level of TASKS and is fixed by rule, so held-out tasks are instructions
and combinations never seen in training, yet built from seen primitives and phrases:
  * held-out combinations: a pair whose two operation types are one of HELD_OUT_PAIRS
    (in either order), e.g. reverse+first or sort+last; each primitive alone is a train task;
  * held-out parameters: every task using k = 3 (first/last) or n = 3 (add): train tasks see
    k in {1, 2, 4} and n in {1, 2, 4, 5}.
`num_test_tasks` tasks are drawn from the held-out pool, half of them held-out combinations
of seen parameters, half held-out parameters; the train tasks are all single
primitives with seen parameters plus pairs drawn from the rest, `num_train_tasks` in all.

The pretraining text (C4 json.gz lines) is demonstrations of TRAIN tasks only, written as
prose, so pretraining never shows a held-out instruction. Everything is deterministic for a
seed (gzip written with mtime 0: same seed, same bytes).
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SPLIT = "synthetic"
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen")
COLOURS = ("red", "blue", "green", "pink", "gold", "gray")
DIGITS = tuple(str(d) for d in range(10))
CATEGORIES = {"animals": ANIMALS.__contains__, "colours": COLOURS.__contains__, "numbers": str.isdigit}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
HELD_OUT_PARAMS = {"first": 3, "last": 3, "add": 3}
HELD_OUT_PAIRS = {frozenset(p) for p in [("reverse", "first"), ("sort", "last"), ("remove", "count"),
                                         ("add", "reverse"), ("keep", "sort"), ("double", "last")]}


@dataclass(frozen=True)
class Op:
    kind: str  # the operation type (reverse, first, keep, ...)
    name: str  # kind plus parameter, for task names: first2, keep_animals
    phrase: str  # the instruction text, lower case
    apply: Callable[[list[str]], list[str]]


def _add(n: int) -> Callable[[list[str]], list[str]]:
    return lambda xs: [str(int(x) + n) if x.isdigit() else x for x in xs]


def primitives() -> list[Op]:
    ops = [
        Op("reverse", "reverse", "reverse the order of the items", lambda xs: xs[::-1]),
        Op("sort", "sort", "sort the items alphabetically", sorted),
        Op("upper", "upper", "write the items in capital letters", lambda xs: [x.upper() for x in xs]),
        Op("double", "double", "write each item twice", lambda xs: [y for x in xs for y in (x, x)]),
        Op("count", "count", "count the items", lambda xs: [str(len(xs))]),
    ]
    for k in range(1, 5):
        items = "item" if k == 1 else "items"
        ops.append(Op("first", f"first{k}", f"keep the first {NUMBER_WORDS[k]} {items}", lambda xs, k=k: xs[:k]))
        ops.append(Op("last", f"last{k}", f"keep the last {NUMBER_WORDS[k]} {items}", lambda xs, k=k: xs[-k:]))
    for cat, member in CATEGORIES.items():
        ops.append(Op("keep", f"keep_{cat}", f"keep only the {cat}", lambda xs, m=member: [x for x in xs if m(x)]))
        ops.append(Op("remove", f"remove_{cat}", f"remove the {cat}", lambda xs, m=member: [x for x in xs if not m(x)]))
    for n in range(1, 6):
        ops.append(Op("add", f"add{n}", f"add {n} to each number", _add(n)))
    return ops


@dataclass(frozen=True)
class Task:
    ops: tuple[Op, ...]

    @property
    def name(self) -> str:
        return "synthetic_" + "_then_".join(op.name for op in self.ops)

    @property
    def definition(self) -> str:
        text = ", then ".join(op.phrase for op in self.ops)
        return text[0].upper() + text[1:] + "."

    def run(self, items: list[str]) -> str:
        for op in self.ops:
            items = op.apply(items)
        return " ".join(items) or "none"

    @property
    def held_out_param(self) -> bool:
        return any(op.name == f"{kind}{v}" for op in self.ops for kind, v in HELD_OUT_PARAMS.items())

    @property
    def held_out_pair(self) -> bool:
        return len(self.ops) == 2 and frozenset(op.kind for op in self.ops) in HELD_OUT_PAIRS

    @property
    def held_out(self) -> bool:
        return self.held_out_param or self.held_out_pair


def catalogue() -> list[Task]:
    """Every task: each primitive alone, and each ordered pair of two different kinds
    (count only last, since it ends the list)."""
    ops = primitives()
    tasks = [Task((op,)) for op in ops]
    for a, b in itertools.permutations(ops, 2):
        if a.kind != b.kind and a.kind != "count":
            tasks.append(Task((a, b)))
    return tasks


def split_tasks(num_train_tasks: int, num_test_tasks: int, seed: int) -> tuple[list[Task], list[Task]]:
    rng = random.Random(seed)
    tasks = catalogue()
    held_out = [t for t in tasks if t.held_out]
    singles = [t for t in tasks if not t.held_out and len(t.ops) == 1]
    pairs = [t for t in tasks if not t.held_out and len(t.ops) == 2]
    if num_train_tasks < len(singles) or num_train_tasks > len(singles) + len(pairs):
        raise ValueError(f"synthetic: num_train_tasks must be in [{len(singles)}, "
                         f"{len(singles) + len(pairs)}] (every seen primitive alone, plus pairs)")
    combos = [t for t in held_out if not t.held_out_param]
    params = [t for t in held_out if t.held_out_param]
    if not 2 <= num_test_tasks <= 2 * min(len(combos), len(params)):
        raise ValueError(f"synthetic: num_test_tasks must be in [2, {2 * min(len(combos), len(params))}]")
    train = singles + rng.sample(pairs, num_train_tasks - len(singles))
    test = rng.sample(combos, num_test_tasks // 2) + rng.sample(params, num_test_tasks - num_test_tasks // 2)
    return train, test


def random_items(rng: random.Random) -> list[str]:
    pool = ANIMALS + COLOURS + DIGITS
    return [rng.choice(pool) for _ in range(rng.randint(4, 6))]


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
        lines.append(f"{task.definition} The list {' '.join(items)} becomes {task.run(items)}.")
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
        """All text of the suite (instructions, inputs, outputs, pretraining), for train_tokenizer."""
        for path in sorted((Path(self.sni_path) / "tasks").glob("*.json")):
            task = json.loads(path.read_text())
            yield from task["Definition"]
            for inst in task["Instances"]:
                yield inst["input"]
                yield from inst["output"]
        with gzip.open(Path(self.root) / "c4" / "synthetic-pretrain.json.gz", "rt") as f:
            for line in f:
                yield json.loads(line)["text"]


def write_suite(out_dir: str | Path, *, num_train_tasks: int = 60, num_test_tasks: int = 12,
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
