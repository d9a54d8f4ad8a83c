"""C4 pretraining examples: allenai/c4 json.gz lines `{text, timestamp, url}`.

The documents are tokenised and packed end to end (an EOS between documents) into segments of
`segment_len` tokens; each segment is cut at two random points 1 <= s1 <= s2 <= len-1 drawn
from a seeded generator: x1 = seg[:s1] -> hypernetwork, x2 = seg[s1:s2] -> model input,
x3 = seg[s2:] -> target, each followed by EOS. Packing needs token counts, so C4 is tokenised
here, where it is read, rather than in the pipeline's tokenisation stage.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from pipelines import files
from pipelines.bad_records import BadRecords
from pipelines.example import Example
from pipelines.spec import SourceSpec, SpecError
from pipelines.tokenizer import EOS_ID, Tokenizer

TASK = "c4"


def documents(pattern: str, bad: BadRecords) -> Iterator[str]:
    """The `text` of every line of every file the path or glob names, in file order."""
    paths = files.expand(pattern)
    if not paths:
        raise SpecError(f"c4: no files match {pattern}")
    for path in paths:
        for lineno, doc in files.read_json_objects(path, bad):
            text = doc.get("text")
            if not isinstance(text, str) or not text.strip():
                bad.report(path, "missing or empty 'text'", lineno)
                continue
            yield text


def segments(docs: Iterator[str], tokenizer: Tokenizer, segment_len: int, chunk: int = 64) -> Iterator[list[int]]:
    """Pack tokenised documents (each ending in EOS) into segments of segment_len tokens; a
    final partial segment is kept when it has at least 3 tokens (one per part)."""
    buffer: list[int] = []
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == chunk:
            yield from _drain(buffer, tokenizer.encode_batch(batch), segment_len)
            batch = []
    yield from _drain(buffer, tokenizer.encode_batch(batch), segment_len)
    if len(buffer) >= 3:
        yield buffer


def _drain(buffer: list[int], encoded: list[list[int]], segment_len: int) -> Iterator[list[int]]:
    for ids in encoded:
        buffer.extend(ids)
        while len(buffer) >= segment_len:
            yield buffer[:segment_len]
            del buffer[:segment_len]


def split_segment(segment: list[int], rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """(x1, x2, x3) cut at 1 <= s1 <= s2 <= len-1, EOS appended to each."""
    s1, s2 = sorted(rng.randint(1, len(segment) - 1) for _ in range(2))
    return segment[:s1] + [EOS_ID], segment[s1:s2] + [EOS_ID], segment[s2:] + [EOS_ID]


def examples(spec: SourceSpec, tokenizer: Tokenizer, bad: BadRecords, seed: int) -> Iterator[Example]:
    rng = random.Random(f"c4:{seed}")
    for segment in segments(documents(spec.path, bad), tokenizer, spec.segment_len):
        x1, x2, x3 = split_segment(segment, rng)
        yield Example(task=TASK, hyper=x1, input=x2, target=x3)
