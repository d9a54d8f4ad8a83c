"""C4 pretraining examples: allenai/c4 json.gz lines `{text, timestamp, url}`.

The documents are tokenised and packed end to end (an EOS between documents) into segments of
`segment_len` tokens (L), and each segment is cut at random points from a seeded generator,
drawn as the reference draws them (`tf.random.stateless_uniform`, maxval exclusive):

- `pretrain` (c4/c4_registry.py): nested draws s1 ~ U[1, L-2), then s2 ~ U[s1, L-2), so the
  parts average about L/2, L/4, L/4 tokens: x1 = seg[:s1] -> hypernetwork, x2 = seg[s1:s2] ->
  model input (may be empty), x3 = seg[s2:] -> target (at least 3 tokens).
- `caclm` (c4/c4_registry_4part.py, the paper's Table 4 'CACLM', after Phang et al.): s1 ~
  U[1, L-4), s2 ~ U[s1, L-3), s3 ~ U[s2, L-2); hypernetwork = seg[:s1] + EOS + seg[s3:], model
  input = seg[s1:s2], target = seg[s2:s3].

Each part is followed by EOS. Packing needs token counts, so C4 is tokenised here, where it is
read, rather than in the pipeline's tokenisation stage.

The causal layout (a decoder-only model, issue 20): the same draws, the hypernetwork reads x1
(or CACLM's hyper part) and the model continues x2 with x3, so only the target ends in EOS (the
prompt goes on), and x2 keeps at least one token for x3 to follow: where the draw left it empty
(s2 = s1), it takes x3's first token (T5's decoder starts from its own start token instead; a
decoder-only model reading the instruction apart, as `lora_only`, has nothing before x3).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator, Sequence

from pipelines import files
from pipelines.bad_records import BadRecords
from pipelines.example import Example, load_rng, save_rng
from pipelines.spec import MIN_SEGMENT, SourceSpec, SpecError
from pipelines.tokenizer import Tokenizer

TASK = "c4"


class Documents:
    """The `text` of every line of every file the path or glob names, in file order, from
    `position` on: (file number, byte offset in it, lines before it), which it keeps as the
    place the next document is read from. `read` counts the documents it read."""

    def __init__(self, pattern: str, bad: BadRecords, position: Sequence[int] = (0, 0, 0)):
        self.paths = files.expand(pattern)
        if not self.paths:
            raise SpecError(f"c4: no files match {pattern}")
        self.bad = bad
        self.position = tuple(position)
        self.read = 0
        self._texts = self._documents()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._texts)

    def _documents(self) -> Iterator[str]:
        first, offset, line = self.position
        for number in range(first, len(self.paths)):
            path = self.paths[number]
            for lineno, end, doc in files.read_json_objects(path, self.bad, (offset, line)):
                self.position = (number, end, lineno)
                text = doc.get("text")
                if not isinstance(text, str) or not text.strip():
                    self.bad.report(path, "missing or empty 'text'", lineno)
                    continue
                self.read += 1
                yield text
            offset, line = 0, 0
            self.position = (number + 1, 0, 0)


def segments(docs: Iterable[str], tokenizer: Tokenizer, segment_len: int, chunk: int = 64,
             min_len: int = MIN_SEGMENT["pretrain"], buffer: list[int] | None = None) -> Iterator[list[int]]:
    """Pack tokenised documents (each ending in EOS) into segments of segment_len tokens; a
    final partial segment is kept when it has at least min_len tokens (what the split needs).
    `buffer` is the packing buffer, a resumed reader's: between two segments it holds every
    token read and not yet packed (what C4Examples.position saves)."""
    docs = iter(docs)
    buffer = [] if buffer is None else buffer
    while True:
        batch = list(itertools.islice(docs, chunk))
        for ids in tokenizer.encode_batch(batch):
            buffer.extend(ids)
        while len(buffer) >= segment_len:
            segment = buffer[:segment_len]
            del buffer[:segment_len]
            yield segment
        if len(batch) < chunk:
            break
    if len(buffer) >= min_len:
        segment = buffer[:]
        del buffer[:]
        yield segment


def split_segment(segment: list[int], rng: random.Random, eos_id: int,
                  causal: bool = False) -> tuple[list[int], list[int], list[int]]:
    """(x1, x2, x3) of the `pretrain` format, EOS appended to each; `causal`: x2 not empty and
    only x3 ends in EOS (module docstring)."""
    end = len(segment) - 2
    s1 = rng.randrange(1, end)
    s2 = rng.randrange(s1, end)
    if causal:
        s2 = max(s2, s1 + 1)  # s1 <= end - 1: x3 keeps at least 2 tokens
        return segment[:s1], segment[s1:s2], segment[s2:] + [eos_id]
    return segment[:s1] + [eos_id], segment[s1:s2] + [eos_id], segment[s2:] + [eos_id]


def split_segment_4part(segment: list[int], rng: random.Random, eos_id: int,
                        causal: bool = False) -> tuple[list[int], list[int], list[int]]:
    """(hyper, input, target) of the `caclm` format, EOS appended to each; `causal`: the input
    not empty and only the target ends in EOS (module docstring)."""
    n = len(segment)
    s1 = rng.randrange(1, n - 4)
    s2 = rng.randrange(s1, n - 3)
    s3 = rng.randrange(s2, n - 2)
    if causal:
        s2 = max(s2, s1 + 1)
        s3 = max(s3, s2)
        return segment[:s1] + [eos_id] + segment[s3:], segment[s1:s2], segment[s2:s3] + [eos_id]
    return (segment[:s1] + [eos_id] + segment[s3:] + [eos_id], segment[s1:s2] + [eos_id],
            segment[s2:s3] + [eos_id])


class C4Examples:
    """A c4 source's examples, from `start` on: a `position()` an earlier reader gave (the next
    document's place, the tokens read and not yet packed, the splitter's random state), so that
    a resumed pass reads and tokenises nothing it had read before (pipelines/mixing.py)."""

    def __init__(self, spec: SourceSpec, tokenizer: Tokenizer, bad: BadRecords, seed: int,
                 start: dict | None = None, causal: bool = False):
        start = start or {}
        self.docs = Documents(spec.path, bad, start.get("document", (0, 0, 0)))
        self.buffer = list(start.get("buffer", []))
        self.rng = random.Random(f"c4:{seed}")
        if "rng" in start:
            load_rng(self.rng, start["rng"])
        split = split_segment_4part if spec.format == "caclm" else split_segment
        packed = segments(self.docs, tokenizer, spec.segment_len, min_len=MIN_SEGMENT[spec.format],
                          buffer=self.buffer)
        self._examples = (Example(TASK, *split(segment, self.rng, tokenizer.eos_id, causal))
                          for segment in packed)

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        return next(self._examples)

    def position(self) -> dict:
        return {"document": list(self.docs.position), "buffer": list(self.buffer),
                "rng": save_rng(self.rng)}
