"""Greedy and beam-search decoding over a step function with a key/value cache.

`step(tokens [N, 1]) -> log-probabilities or logits [N, vocab]` runs the decoder one token
further on its cache; `reorder(origin [N])` makes row r of the cache a copy of row origin[r]
(beam search only). Both return the new tokens [B, <= max_new_tokens] (no start token), each
row stopping at EOS and padded after it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def greedy(step: Callable[[Tensor], Tensor], batch: int, max_new_tokens: int, pad: int, eos: int,
           device) -> Tensor:
    token = torch.full((batch, 1), pad, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = []
    for _ in range(max_new_tokens):
        token = step(token).argmax(-1).masked_fill(done, pad).unsqueeze(1)
        out.append(token)
        done |= token.squeeze(1) == eos
        if bool(done.all()):
            break
    return torch.cat(out, dim=1) if out else torch.zeros(batch, 0, dtype=torch.long, device=device)


def beam_search(step: Callable[[Tensor], Tensor], reorder: Callable[[Tensor], None], batch: int,
                num_beams: int, max_new_tokens: int, pad: int, eos: int, device,
                length_penalty: float = 1.0) -> Tensor:
    """Beam search as Hugging Face's (no early stopping), on whole-batch tensors: per example,
    the num_beams best live hypotheses; a candidate ending in EOS among an example's num_beams
    best is finished with score sum(log p) / length ** length_penalty; an example is done when
    it holds num_beams finished ones and no live beam can beat the worst of them. The cache
    rows are example-major: row b * num_beams + j is beam j of b."""
    k = num_beams
    rows = torch.arange(batch, device=device)[:, None] * k  # [B, 1]: each example's first row
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: only the first one may expand
    tokens = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    last = torch.full((batch * k, 1), pad, dtype=torch.long, device=device)
    # the k best finished hypotheses per example, best first, padded to max_new_tokens
    kept = _Finished(batch, k, max_new_tokens, pad, device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for length in range(1, max_new_tokens + 1):
        logprobs = torch.log_softmax(step(last).float(), dim=-1)
        vocab = logprobs.shape[-1]
        candidates = (scores.view(-1, 1) + logprobs).view(batch, k * vocab)
        top_scores, top_ids = candidates.topk(2 * k, dim=1)  # [B, 2k], best first
        beam, token = top_ids // vocab, top_ids % vocab
        ends = token == eos
        # EOS candidates among the k best finish; at most k of the 2k end in EOS (one per
        # beam), so the first k others are always there to live on.
        rank = torch.arange(2 * k, device=device)
        finishing = ends & (rank < k) & ~done[:, None]
        ended = torch.cat([tokens.view(batch, k, -1).gather(
            1, beam[..., None].expand(-1, -1, tokens.shape[1])), token[..., None]], dim=2)
        kept.add(torch.where(finishing, top_scores / length ** length_penalty, float("-inf")),
                 ended, length)
        live = torch.argsort((ends.long() * 2 * k + rank), dim=1, stable=True)[:, :k]
        next_scores, next_beam = top_scores.gather(1, live), beam.gather(1, live)
        next_tokens = token.gather(1, live)
        best_live = next_scores.max(dim=1).values / length ** length_penalty
        done |= kept.full() & (kept.scores[:, -1] >= best_live)
        if bool(done.all()):
            break
        # done examples keep their rows and stop growing
        origin = torch.where(done[:, None], rows + torch.arange(k, device=device), rows + next_beam)
        next_tokens = next_tokens.masked_fill(done[:, None], pad)
        scores = next_scores.masked_fill(done[:, None], float("-inf"))
        tokens = torch.cat([tokens.index_select(0, origin.view(-1)), next_tokens.view(-1, 1)], dim=1)
        last = next_tokens.view(-1, 1)
        reorder(origin.view(-1))
    # at the length limit, live beams compete with the finished ones
    open_ = torch.where(done[:, None], float("-inf"), scores / tokens.shape[1] ** length_penalty)
    kept.add(open_, tokens.view(batch, k, -1), tokens.shape[1])
    width = int(kept.lengths[:, 0].max())
    return kept.tokens[:, 0, :width]


class _Finished:
    """The k best finished hypotheses of each example: scores [B, k] (best first, -inf for
    none yet), tokens [B, k, max_len] (pad after each one's length), lengths [B, k]."""

    def __init__(self, batch: int, k: int, max_len: int, pad: int, device):
        self.k, self.max_len, self.pad = k, max_len, pad
        self.scores = torch.full((batch, k), float("-inf"), device=device)
        self.tokens = torch.full((batch, k, max_len), pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, k, dtype=torch.long, device=device)

    def add(self, scores: Tensor, tokens: Tensor, length: int) -> None:
        """Candidates [B, n] (-inf: none) of `length` tokens [B, n, length]. Kept before new,
        and new in order, on equal scores (a stable sort), as a list kept sorted would."""
        tokens = F.pad(tokens, (0, self.max_len - tokens.shape[2]), value=self.pad)
        lengths = torch.full_like(scores, length, dtype=torch.long)
        all_scores = torch.cat([self.scores, scores], dim=1)
        order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.scores = all_scores.gather(1, order)
        self.lengths = torch.cat([self.lengths, lengths], dim=1).gather(1, order)
        self.tokens = torch.cat([self.tokens, tokens], dim=1).gather(
            1, order[..., None].expand(-1, -1, self.max_len))

    def full(self) -> Tensor:
        return self.scores[:, -1] > float("-inf")
