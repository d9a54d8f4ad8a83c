"""Greedy and beam-search decoding over a step function with a key/value cache.

`step(tokens [N, 1]) -> log-probabilities or logits [N, vocab]` runs the decoder one token
further on its cache; `reorder(origin [N])` makes row r of the cache a copy of row origin[r]
(beam search only). Both return the new tokens [B, <= max_new_tokens] (no start token), each
row stopping at EOS and padded after it.
"""

from __future__ import annotations

from typing import Callable

import torch
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
    """Beam search as Hugging Face's (no early stopping): per example, the num_beams best live
    hypotheses; one ending in EOS is finished with score sum(log p) / length ** length_penalty;
    an example is done when it holds num_beams finished ones and no live beam can beat the
    worst of them. The cache rows are example-major: row b * num_beams + j is beam j of b."""
    k = num_beams
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: only the first one may expand
    tokens = torch.zeros(batch * k, 0, dtype=torch.long, device=device)
    last = torch.full((batch * k, 1), pad, dtype=torch.long, device=device)
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for length in range(1, max_new_tokens + 1):
        logprobs = torch.log_softmax(step(last).float(), dim=-1)
        vocab = logprobs.shape[-1]
        candidates = (scores.view(-1, 1) + logprobs).view(batch, k * vocab)
        top_scores, top_ids = candidates.topk(2 * k, dim=1)
        origin = torch.zeros(batch, k, dtype=torch.long, device=device)
        next_tokens = torch.full((batch, k), pad, dtype=torch.long, device=device)
        next_scores = torch.full((batch, k), float("-inf"), device=device)
        for b in range(batch):
            if done[b]:
                origin[b] = torch.arange(k, device=device) + b * k
                continue
            live = 0
            for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                beam, token = divmod(flat, vocab)
                if token == eos:
                    if rank < k:
                        hyp = torch.cat([tokens[b * k + beam], tokens.new_tensor([eos])])
                        _add(finished[b], k, score / length ** length_penalty, hyp)
                    continue
                origin[b, live], next_tokens[b, live], next_scores[b, live] = b * k + beam, token, score
                live += 1
                if live == k:
                    break
            best_live = float(next_scores[b].max()) / length ** length_penalty
            done[b] = len(finished[b]) == k and finished[b][-1][0] >= best_live
        if all(done):
            break
        flat_origin = origin.view(-1)
        tokens = torch.cat([tokens.index_select(0, flat_origin), next_tokens.view(-1, 1)], dim=1)
        scores = next_scores
        last = next_tokens.view(-1, 1)
        reorder(flat_origin)
    for b in range(batch):  # at the length limit, live beams compete with the finished ones
        if not done[b]:
            for j in range(k):
                if scores[b, j] > float("-inf"):
                    _add(finished[b], k, float(scores[b, j]) / tokens.shape[1] ** length_penalty,
                         tokens[b * k + j])
    best = [finished[b][0][1] for b in range(batch)]
    width = max(len(t) for t in best)
    out = torch.full((batch, width), pad, dtype=torch.long, device=device)
    for b, t in enumerate(best):
        out[b, :len(t)] = t
    return out


def _add(hyps: list[tuple[float, Tensor]], k: int, score: float, tokens: Tensor) -> None:
    """Keep the k best (score, tokens), best first."""
    hyps.append((score, tokens))
    hyps.sort(key=lambda h: -h[0])
    del hyps[k:]
