"""TaskModules: everything a task contributes to the underlying model, computed once.

The generated PEFT weights (see `peft.py` for the layout) and, with instruction fusion, the
encoded instruction already projected to every decoder layer's cross-attention keys and values
(`instruction_key` / `instruction_value` [T, decoder layers, M, inner]) with its padding mask
[T, M]: per input, nothing of the instruction is recomputed. Every tensor has a leading task
dimension: one row for a cached task (applied to batches of any size), one row per unique
instruction inside a forward, or several cached tasks stacked for a mixed-task batch.
Saved as safetensors, never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

_INSTRUCTION = ("instruction_key", "instruction_value", "instruction_mask")


@dataclass
class TaskModules:
    peft: dict[str, Tensor] = field(default_factory=dict)
    instruction_key: Tensor | None = None  # [T, decoder layers, M, inner], fusion only
    instruction_value: Tensor | None = None
    instruction_mask: Tensor | None = None  # [T, M]

    @property
    def num_tasks(self) -> int:
        for t in (*self.peft.values(), self.instruction_key):
            if t is not None:
                return t.shape[0]
        return 1

    @property
    def nbytes(self) -> int:
        """Bytes this task state holds (what a cache of task states is bounded by)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict[str, Tensor]:
        out = {f"peft.{k}": v for k, v in self.peft.items()}
        out.update({name: getattr(self, name) for name in _INSTRUCTION if getattr(self, name) is not None})
        return out

    def to(self, *args, **kwargs) -> "TaskModules":
        move = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        return TaskModules({k: move(v) for k, v in self.peft.items()},
                           *(move(getattr(self, name)) for name in _INSTRUCTION))

    @classmethod
    def stack(cls, tasks: list["TaskModules"]) -> "TaskModules":
        """One TaskModules of len(tasks) rows, for a batch mixing those tasks (pass each
        example's row as `task_index`). Fused instructions of different lengths are padded
        (masked out); tasks of one model share the same kinds."""
        if not tasks:
            raise ValueError("TaskModules.stack: no tasks")
        if any(t.num_tasks != 1 for t in tasks):
            raise ValueError("TaskModules.stack takes single-task modules")
        peft = {k: torch.cat([t.peft[k] for t in tasks]) for k in tasks[0].peft}
        if tasks[0].instruction_key is None:
            return cls(peft)
        width = max(t.instruction_mask.shape[1] for t in tasks)

        def pad(t: Tensor, dim: int) -> Tensor:
            missing = width - t.shape[dim]
            return F.pad(t, (0, 0, 0, missing) if dim == 2 else (0, missing)) if missing else t

        return cls(peft, torch.cat([pad(t.instruction_key, 2) for t in tasks]),
                   torch.cat([pad(t.instruction_value, 2) for t in tasks]),
                   torch.cat([pad(t.instruction_mask, 1) for t in tasks]))

    def save(self, path: str | Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._tensors().items()}
        # The format tag lets load() refuse any other safetensors file (e.g. a model export).
        save_file(tensors, str(path), metadata={"format": "hint-task-modules"})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "TaskModules":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task modules file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                if (f.metadata() or {}).get("format") != "hint-task-modules":
                    raise ValueError(f"{path}: not a TaskModules file (metadata format is "
                                     f"{(f.metadata() or {}).get('format')!r})")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except OSError as e:
            raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
        unknown = [k for k in tensors if not k.startswith("peft.") and k not in _INSTRUCTION]
        if unknown:
            raise ValueError(f"{path}: unexpected tensor {unknown[0]!r} in task modules")
        return cls({k[len("peft."):]: v for k, v in tensors.items() if k.startswith("peft.")},
                   *(tensors.get(name) for name in _INSTRUCTION))
