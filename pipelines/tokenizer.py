"""The T5 SentencePiece tokenizer, loaded from a directory, and a small one trained for the demo.

We use `sentencepiece` directly rather than `transformers`: in transformers 5.24
`T5Tokenizer(vocab_file=...)` silently ignores the file, and the SentencePiece model is all a
T5 tokenizer is (ids: pad 0, eos 1, unk 2; no BOS). The model's bytes (`proto`) travel to Ray
workers with the pipeline, so workers need no shared filesystem.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

MODEL_FILE = "spiece.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    """SentencePiece encode/decode with T5's conventions (EOS appended by `encode`)."""

    def __init__(self, proto: bytes):
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        if (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(f"tokenizer: expected pad/eos/unk ids {PAD_ID}/{EOS_ID}/{UNK_ID} (T5), got "
                             f"{self.sp.pad_id()}/{self.sp.eos_id()}/{self.sp.unk_id()}")
        self.pad_id, self.eos_id = PAD_ID, EOS_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, max_len: int | None = None, eos: bool = True) -> list[int]:
        """Token ids of `text`, cut to `max_len` tokens including the EOS."""
        # One string directly: a list goes through SentencePiece's thread pool (~3x slower alone).
        return _cut(self.sp.encode(text), max_len, eos)

    def encode_batch(self, texts: list[str], max_len: int | None = None, eos: bool = True) -> list[list[int]]:
        return [_cut(ids, max_len, eos) for ids in self.sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, stopping at the first EOS and ignoring padding and -100."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i >= 0 and i != PAD_ID:
                kept.append(i)
        return self.sp.decode(kept)


def _cut(ids: list[int], max_len: int | None, eos: bool) -> list[int]:
    ids = ids[:None if max_len is None else max_len - eos]
    return ids + [EOS_ID] if eos else ids


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer in `directory` (a Hugging Face T5 tokenizer directory, or one written by
    `train_tokenizer`): it must hold spiece.model."""
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no {MODEL_FILE} in {directory} (expected a T5 "
                                "SentencePiece tokenizer directory, or one from train_tokenizer)")
    return tokenizer_from_proto(path.read_bytes())


@functools.lru_cache(maxsize=4)
def tokenizer_from_proto(proto: bytes) -> Tokenizer:
    """The tokenizer for a model's bytes, built once per process (Ray workers call this)."""
    return Tokenizer(proto)


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000) -> Tokenizer:
    """Train a small BPE SentencePiece model on `texts` with T5's special ids, write
    out_dir/spiece.model, and return it loaded. BPE, not T5's unigram: on a small, repetitive
    corpus like the demo's, unigram training stops at ~140 pieces and spells most words
    letter by letter ("Definition" as 5 pieces); BPE keeps whole words. Well under a second
    on a demo corpus."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t.strip()), model_writer=out,
        vocab_size=vocab_size, hard_vocab_limit=False, model_type="bpe",
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / MODEL_FILE).write_bytes(out.getvalue())
    return load_tokenizer(out_dir)
