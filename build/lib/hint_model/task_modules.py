"""TaskModules: everything a task contributes to the underlying model, computed once.

The generated PEFT weights (see `peft.py` for the layout) and, with instruction fusion, the
encoded instruction and its mask. Every tensor has a leading task dimension: one row for a
cached task (applied to batches of any size), one row per unique instruction inside a forward.
Saved as safetensors, never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

_INSTRUCTION = ("instruction_states", "instruction_mask")


@dataclass
class TaskModules:
    peft: dict[str, Tensor] = field(default_factory=dict)
    instruction_states: Tensor | None = None  # [T, L, d], fusion only
    instruction_mask: Tensor | None = None  # [T, L]

    @property
    def num_tasks(self) -> int:
        for t in (*self.peft.values(), self.instruction_states):
            if t is not None:
                return t.shape[0]
        return 1

    def to(self, *args, **kwargs) -> "TaskModules":
        move = lambda t: None if t is None else t.to(*args, **kwargs)  # noqa: E731
        return TaskModules({k: move(v) for k, v in self.peft.items()},
                           move(self.instruction_states), move(self.instruction_mask))

    def save(self, path: str | Path) -> None:
        tensors = {f"peft.{k}": v.detach().contiguous().cpu() for k, v in self.peft.items()}
        if self.instruction_states is not None:
            tensors["instruction_states"] = self.instruction_states.detach().contiguous().cpu()
            tensors["instruction_mask"] = self.instruction_mask.detach().contiguous().cpu()
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
                   tensors.get("instruction_states"), tensors.get("instruction_mask"))
