"""The training objective of the reference: token cross-entropy plus t5x's z-loss.

t5x `cross_entropy_with_logits(logits, targets, z_loss)` adds `z_loss * log(Z)**2` per token,
Z the softmax normaliser, which keeps the logits from drifting (gins/hyper_base.gin: Z_LOSS =
0.0001). Both terms are summed over the target tokens (labels != -100), as the reference
(LOSS_NORMALIZING_FACTOR = None there: a plain sum). The training loop then divides by the
target tokens of its global batch: a constant factor, which Adafactor's update ignores, that
keeps the reported loss per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_loss_sum(logits: Tensor, labels: Tensor, z_loss: float = 0.0) -> Tensor:
    """Sum over target tokens of cross-entropy + z_loss * logsumexp(logits)**2, in fp32.
    logits [B, L, V], labels [B, L] with -100 where there is no target."""
    logits = logits.float().flatten(0, 1)
    labels = labels.flatten()
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    if z_loss:
        log_z = torch.logsumexp(logits, dim=-1)
        total = total + z_loss * (log_z.square() * (labels != -100)).sum()
    return total


def sequence_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """[B] sum of the log-probabilities of the labels (-100 ignored), in fp32: rank
    classification's score. logits [B, L, V] aligned with labels [B, L]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100)).sum(1)
