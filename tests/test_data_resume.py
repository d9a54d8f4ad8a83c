"""A pass resumed from a saved position (pipelines/mixing.py): the same rows as the rest of an
uninterrupted pass, and a cost that does not grow with how far the pass had gone."""

import pytest

from pipelines import SourceSpec, TokenBudget, load_tokenizer
from pipelines.dataset import BLOCK_ROWS, text_blocks


@pytest.fixture
def specs(shared_data):
    sni = {"kind": "sni", "path": str(shared_data / "sni"), "split": "mini", "format": "concat",
           "max_per_task": 12}
    c4 = {"kind": "c4", "path": str(shared_data / "c4" / "*.json.gz"), "segment_len": 64}
    p3 = {"kind": "p3", "format": "joint", "dataset": "super_glue/rte",
          "path": str(shared_data / "p3" / "raw" / "super_glue" / "rte" / "train.jsonl"),
          "templates": str(shared_data / "p3" / "promptsource_templates"), "example_cap": 200}
    return [SourceSpec.from_dict(s) for s in (sni, c4, p3)]


def rows_of(blocks):
    return [row for block in blocks for row in block.to_pylist()]


def test_a_resumed_pass_gives_the_rest_of_the_pass_and_reads_only_from_there(specs, shared_data):
    tok = load_tokenizer(shared_data / "tokenizer" / "t5")
    budget = TokenBudget(tok, max_input_len=256, max_hyper_len=256, max_target_len=64)
    positions = []
    full = rows_of(text_blocks(specs, budget, on_bad_record="skip", seed=3, epoch=1,
                               on_block=positions.append))
    assert len(positions) >= 8 and [p["index"] for p in positions] == list(range(0, len(full), BLOCK_ROWS))
    costs = {}
    for block in (1, len(positions) // 2, len(positions) - 1):
        start = positions[block]
        before = tok.texts_encoded
        resumed = text_blocks(specs, budget, on_bad_record="skip", seed=3, epoch=1, start=start)
        first = next(resumed)
        costs[block] = tok.texts_encoded - before  # texts tokenised before its first block
        assert rows_of([first, *resumed]) == full[start["index"]:]
    # A fresh pass tokenises some texts (SNI definitions, C4 documents) before its first block: a
    # resumed one no more than that and one C4 chunk, however late it starts.
    before = tok.texts_encoded
    next(text_blocks(specs, budget, on_bad_record="skip", seed=3, epoch=1))
    fresh = tok.texts_encoded - before
    assert max(costs.values()) <= fresh + 64, (costs, fresh)
