"""Beam search on whole-batch tensors against the plain per-example loop it replaced (which
matched transformers, see test_model_serving_state), on a toy decoder whose next-token
distribution depends on each row's whole history and whose EOS is frequent."""

import pytest
import torch

from hint_model.decoding import beam_search

PAD, EOS, VOCAB = 0, 1, 6


class ToyDecoder:
    """step(last) appends each row's last token to its history (which starts with its example's
    index) and returns logits seeded by that history; reorder(origin) copies histories as the
    model's cache rows are copied."""

    def __init__(self, batch: int, k: int, seed: int):
        self.histories = [(row // k,) for row in range(batch * k)]
        self.seed = seed

    def step(self, last: torch.Tensor) -> torch.Tensor:
        self.histories = [h + (t,) for h, t in zip(self.histories, last[:, 0].tolist())]
        out = []
        for h in self.histories:
            g = torch.Generator().manual_seed(hash((self.seed, h)) % 2**31)
            logits = torch.randn(VOCAB, generator=g) * 2
            logits[EOS] += 0.5  # frequent EOS: hypotheses finish early and at the limit
            out.append(logits)
        return torch.stack(out)

    def reorder(self, origin: torch.Tensor) -> None:
        self.histories = [self.histories[i] for i in origin.tolist()]


def loop_beam_search(step, reorder, batch, k, max_new_tokens, length_penalty):
    """The per-example loop, as Hugging Face's beam search without early stopping."""
    scores = [[0.0] + [float("-inf")] * (k - 1) for _ in range(batch)]
    tokens = [[] for _ in range(batch * k)]
    last = torch.full((batch * k, 1), PAD)
    finished = [[] for _ in range(batch)]
    done = [False] * batch
    for length in range(1, max_new_tokens + 1):
        logprobs = torch.log_softmax(step(last).float(), dim=-1)
        origin, next_tokens, next_scores = [], [], []
        for b in range(batch):
            if done[b]:
                origin += [b * k + j for j in range(k)]
                next_tokens += [PAD] * k
                next_scores.append([float("-inf")] * k)
                continue
            flat = [(scores[b][j] + float(logprobs[b * k + j, t]), j, t)
                    for j in range(k) for t in range(VOCAB)]
            top = sorted(flat, key=lambda c: -c[0])[:2 * k]
            live = []
            for rank, (score, j, t) in enumerate(top):
                if t == EOS:
                    if rank < k:
                        finished[b].append((score / length ** length_penalty, tokens[b * k + j] + [EOS]))
                        finished[b].sort(key=lambda h: -h[0])
                        del finished[b][k:]
                    continue
                live.append((score, j, t))
                if len(live) == k:
                    break
            origin += [b * k + j for _, j, _ in live]
            next_tokens += [t for _, _, t in live]
            next_scores.append([s for s, _, _ in live])
            best = max(next_scores[-1]) / length ** length_penalty
            done[b] = len(finished[b]) == k and finished[b][-1][0] >= best
        if all(done):
            break
        tokens = [tokens[o] + [t] for o, t in zip(origin, next_tokens)]
        scores, last = next_scores, torch.tensor(next_tokens)[:, None]
        reorder(torch.tensor(origin))
    for b in range(batch):
        if not done[b]:
            for j in range(k):
                if scores[b][j] > float("-inf"):
                    finished[b].append((scores[b][j] / len(tokens[b * k + j]) ** length_penalty,
                                        tokens[b * k + j]))
            finished[b].sort(key=lambda h: -h[0])
    return [finished[b][0][1] for b in range(batch)]


# each case has examples that end in EOS and examples that run to the length limit
@pytest.mark.parametrize("batch, k, max_new, penalty, seed", [
    (4, 3, 5, 0.6, 2), (3, 2, 3, 1.0, 9), (4, 3, 4, 1.0, 6), (5, 2, 4, 1.0, 7), (3, 4, 5, 1.0, 8)])
def test_batched_beam_search_equals_the_per_example_loop(batch, k, max_new, penalty, seed):
    ours_model, loop_model = ToyDecoder(batch, k, seed), ToyDecoder(batch, k, seed)
    got = beam_search(ours_model.step, ours_model.reorder, batch, k, max_new, PAD, EOS, "cpu",
                      length_penalty=penalty)
    expected = loop_beam_search(loop_model.step, loop_model.reorder, batch, k, max_new, penalty)
    assert got.shape[1] == max(map(len, expected))
    assert [row[:len(e)] for row, e in zip(got.tolist(), expected)] == expected
    assert all(set(row[len(e):]) <= {PAD} for row, e in zip(got.tolist(), expected))
    assert any(e[-1] == EOS for e in expected) and any(e[-1] != EOS for e in expected)
