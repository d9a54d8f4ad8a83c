"""What autograd keeps for backward: the measure the activation-memory estimates are held to."""

from __future__ import annotations

import torch


def saved_values(model: torch.nn.Module, **inputs) -> float:
    """fp32 values autograd saves for backward in `model(**inputs)`, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(saved.values()) / 4
