"""A data source as configs write it: `SourceSpec.from_dict({...})` validates and names the bad key.

kinds and their formats:
- `c4`: allenai/c4 json.gz shards (`path` = file or glob). formats: `pretrain` (the paper's
  3-part split), `caclm` (the 4-part split of the reference's c4_registry_4part.py, the
  paper's Table 4 'CACLM' comparison).
- `sni`: a natural-instructions checkout (`path` = its root, with tasks/ and splits/); the tasks
  of `splits/<split>/<part>_tasks.txt`. formats: `def` (HINT: the hypernetwork reads the
  Definition), `def_pos` (HINT: Definition + `num_pos` positive examples), `concat`
  (Tk-Instruct: everything in the model input, `num_pos` examples), `no_instruct`.
  The synthetic suite (pipelines.synthetic) is written in this layout.
- `p3`: raw dataset records (`path` = jsonl file or glob) rendered with the promptsource
  templates of `dataset` found under `templates`. formats: `joint`, `split`, `concat`.
  `num_shots: k` puts k rendered examples of the same template in front of the instruction
  (the paper's Table 3): in the hypernetwork input for `joint`/`split`, in the model input for
  `concat`; they are drawn from `shots_path` (the dataset's train records; default `path`).
- `p3_rendered`: pre-rendered `{prompt, completion}` jsonl(.gz) files; format `joint` (or
  `concat`); the template text is recovered from `templates` when given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FORMATS = {
    "c4": ("pretrain", "caclm"),
    "sni": ("def", "def_pos", "concat", "no_instruct"),
    "p3": ("joint", "split", "concat"),
    "p3_rendered": ("joint", "concat"),
}
PARTS = ("train", "test")
# The smallest segment each C4 format can cut: the split points of c4.split_segment /
# c4.split_segment_4part need a non-empty range (the reference's draws, see pipelines/c4.py).
MIN_SEGMENT = {"pretrain": 4, "caclm": 6}


class SpecError(ValueError):
    """A source spec that does not validate; the message names the key."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str
    format: str = ""  # "" = the kind's first format
    weight: float = 1.0  # relative sampling weight when several sources are mixed
    part: str = "train"  # train: seeded shuffle, tasks interleaved; test: file order, task by task
    # sni
    split: str = "default"  # splits/<split>/ of the checkout
    max_per_task: int = 100  # instances per task (the paper's 100)
    num_pos: int = -1  # positive examples in the instruction; -1 = 2 for def_pos, 0 for concat
    allow_missing_tasks: bool = False  # a split naming absent task files: warn instead of error
    # c4
    segment_len: int = 512  # tokens per packed pretraining segment
    # p3 / p3_rendered
    templates: str = ""  # promptsource_templates directory
    dataset: str = ""  # p3: e.g. super_glue/rte (templates/<dataset>/templates.yaml)
    example_cap: int = 500_000  # datasets above this count as cap / number of templates
    num_shots: int = 0  # p3: rendered examples of the same template before the instruction
    shots_path: str = ""  # p3: records the shots are drawn from ("" = path; required for part test)
    # p3 / p3_rendered: the reference's hand-edited prompts (seqio_tasks/all_edited_prompts.txt),
    # the hypernetwork's text; "" = each template masked automatically (p3_templates.py)
    edited_prompts: str = ""

    def __post_init__(self):
        if not self.format:
            object.__setattr__(self, "format", FORMATS.get(self.kind, ("",))[0])
        if self.num_pos < 0:
            object.__setattr__(self, "num_pos", 2 if self.format == "def_pos" else 0)

    @property
    def is_train(self) -> bool:
        return self.part == "train"

    @property
    def is_p3(self) -> bool:
        """The T0 mixture's kinds, whose inputs and hypernetwork inputs end without EOS (pipelines.p3)."""
        return self.kind in ("p3", "p3_rendered")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "data source") -> "SourceSpec":
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a mapping, got {data!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SpecError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(fields)}")
        for key in ("kind", "path"):
            if not data.get(key):
                raise SpecError(f"{where}: missing key {key!r}")
        for key, value in data.items():
            expected = {"str": str, "float": (int, float), "int": int, "bool": bool}[fields[key].type]
            if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                raise SpecError(f"{where}: {key}: expected {fields[key].type}, got {value!r}")
        spec = cls(**{k: float(v) if fields[k].type == "float" else v for k, v in data.items()})
        spec.validate(where)
        return spec

    def validate(self, where: str = "data source") -> None:
        if self.kind not in FORMATS:
            raise SpecError(f"{where}: kind: {self.kind!r} is not one of {', '.join(FORMATS)}")
        if self.format not in FORMATS[self.kind]:
            raise SpecError(f"{where}: format: {self.format!r} is not valid for kind {self.kind!r} "
                            f"(valid: {', '.join(FORMATS[self.kind])})")
        if self.part not in PARTS:
            raise SpecError(f"{where}: part: {self.part!r} is not one of {', '.join(PARTS)}")
        for key in ("weight", "max_per_task", "segment_len", "example_cap"):
            if getattr(self, key) <= 0:
                raise SpecError(f"{where}: {key}: must be positive, got {getattr(self, key)}")
        if self.kind == "c4" and self.segment_len < MIN_SEGMENT[self.format]:
            raise SpecError(f"{where}: segment_len: format {self.format!r} needs at least "
                            f"{MIN_SEGMENT[self.format]} tokens a segment, got {self.segment_len}")
        if self.num_shots < 0:
            raise SpecError(f"{where}: num_shots: must be 0 or more, got {self.num_shots}")
        if (self.num_shots or self.shots_path) and self.kind != "p3":
            raise SpecError(f"{where}: num_shots/shots_path: few-shot sources need kind 'p3' (raw records "
                            f"rendered with templates), got kind {self.kind!r}")
        if self.shots_path and not self.num_shots:
            raise SpecError(f"{where}: shots_path: set num_shots (1 or more) to draw shots from it")
        if self.num_shots and not self.is_train and not self.shots_path:
            raise SpecError(f"{where}: num_shots with part 'test' needs shots_path (the dataset's train "
                            "records): shots are never drawn from the records being evaluated")
        if self.edited_prompts and not self.is_p3:
            raise SpecError(f"{where}: edited_prompts: only P3 sources (kind p3, p3_rendered) read it, "
                            f"got kind {self.kind!r}")
        if self.kind == "p3" and not (self.templates and self.dataset):
            raise SpecError(f"{where}: kind p3 needs 'templates' (promptsource_templates directory) "
                            "and 'dataset' (e.g. super_glue/rte)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
