"""Tokenizers, loaded from a directory: T5's SentencePiece model (`spiece.model`, also the small
one trained for the demo), or a Hugging Face `tokenizer.json` (the `tokenizers` library: the
byte-level BPE of GPT-2 and OPT, Llama's, Mistral's, Qwen2's).

Both kinds offer the same surface: `encode` (EOS appended unless `eos=False`), `encode_batch`,
`decode` (stops at EOS), `vocab_size`, and the ids the batches need: `pad_id`, `eos_id` and
`bos_ids` (what the tokenizer puts before a sequence: OPT's `</s>`, Llama's `<s>`, nothing for
GPT-2 and T5). Nothing outside this module assumes an id. `proto` is the bytes that rebuild the
tokenizer (`tokenizer_from_proto`); they travel to Ray workers with the pipeline, so workers need
no shared filesystem.

SentencePiece goes through `sentencepiece` directly rather than `transformers`: in
transformers 5.24 `T5Tokenizer(vocab_file=...)` silently ignores the file, and the
SentencePiece model is all a T5 tokenizer is (ids: pad 0, eos 1, unk 2; no BOS).
A `tokenizer.json` does not say which token ends a sequence or pads it: those come from the
directory's `tokenizer_config.json` (`eos_token`, `pad_token`), else `special_tokens_map.json`,
else the model's `config.json` (`eos_token_id`, `pad_token_id`). Without a pad token (GPT-2,
Llama) the EOS pads: padding is masked anyway.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import tokenizers

MODEL_FILE = "spiece.model"
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# The Hugging Face files beside tokenizer.json that describe its tokens (a chat template too).
SIDE_FILES = (CONFIG_FILE, "special_tokens_map.json")
# The ids a T5 SentencePiece model has (and `train_tokenizer` gives ours).
T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2


class Tokenizer:
    """SentencePiece encode/decode with T5's conventions (EOS appended by `encode`)."""

    bos_ids: tuple[int, ...] = ()  # T5 puts nothing before a sequence
    texts_encoded: int = 0  # by this object, so far: what a reader's work costs (tests, benchmarks)

    def __init__(self, proto: bytes):
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        ids = (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id())
        if ids != (T5_PAD_ID, T5_EOS_ID, T5_UNK_ID):
            raise ValueError(f"tokenizer: expected pad/eos/unk ids {T5_PAD_ID}/{T5_EOS_ID}/"
                             f"{T5_UNK_ID} (T5), got {ids[0]}/{ids[1]}/{ids[2]}")
        self.pad_id, self.eos_id = T5_PAD_ID, T5_EOS_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, max_len: int | None = None, eos: bool = True) -> list[int]:
        """Token ids of `text`, cut to `max_len` tokens including the EOS."""
        # One string directly: a list goes through SentencePiece's thread pool (~3x slower alone).
        self.texts_encoded += 1
        return cut(self.sp.encode(text), max_len, self.eos_id if eos else None)

    def encode_batch(self, texts: list[str], max_len: int | None = None, eos: bool = True) -> list[list[int]]:
        end = self.eos_id if eos else None
        self.texts_encoded += len(texts)
        return [cut(ids, max_len, end) for ids in self.sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, stopping at the first EOS and ignoring padding and -100."""
        return self.sp.decode(self._kept(ids))

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the tokenizer into `directory`, which `load_tokenizer` reads back."""
        (Path(directory) / MODEL_FILE).write_bytes(self.proto)

    def _kept(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if self.bos_ids and tuple(ids[:len(self.bos_ids)]) == self.bos_ids:  # OPT's BOS is its EOS
            ids = ids[len(self.bos_ids):]
        kept = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= 0 and i != self.pad_id:
                kept.append(i)
        return kept


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (module docstring). `proto` is JSON: the tokenizer.json
    text and the eos and pad ids found beside it."""

    def __init__(self, proto: bytes):
        self.proto = proto
        spec = json.loads(proto)
        self.tok = tokenizers.Tokenizer.from_str(spec["tokenizer"])
        self.eos_id, self.pad_id = spec["eos_id"], spec["pad_id"]
        self.bos_ids = _prefix_ids(self.tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, max_len: int | None = None, eos: bool = True) -> list[int]:
        """Token ids of `text` (no BOS: a sequence's parts are encoded apart and joined),
        cut to `max_len` tokens including the EOS."""
        self.texts_encoded += 1
        return cut(self.tok.encode(text, add_special_tokens=False).ids, max_len, self.eos_id if eos else None)

    def encode_batch(self, texts: list[str], max_len: int | None = None, eos: bool = True) -> list[list[int]]:
        end = self.eos_id if eos else None
        self.texts_encoded += len(texts)
        return [cut(e.ids, max_len, end) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(self._kept(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.json, and names the EOS (and a pad token other than it) in the
        directory's tokenizer_config.json (kept otherwise): `load_tokenizer` reads the same ids
        back without the model's config.json."""
        directory = Path(directory)
        (directory / HF_FILE).write_text(json.loads(self.proto)["tokenizer"], encoding="utf-8")
        config = _read_json(directory / CONFIG_FILE)
        config["eos_token"] = self.tok.id_to_token(self.eos_id)
        if self.pad_id != self.eos_id:
            config["pad_token"] = self.tok.id_to_token(self.pad_id)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _prefix_ids(tok: tokenizers.Tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer's post-processor puts before a sequence (its BOS), found by
    encoding a word with and without special tokens."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def cut(ids: list[int], max_len: int | None, eos_id: int | None) -> list[int]:
    """`ids` cut to `max_len` tokens, then `eos_id` appended (counted in `max_len`) when given."""
    if eos_id is None:
        return ids[:max_len]
    return ids[:None if max_len is None else max_len - 1] + [eos_id]


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer in `directory`: `spiece.model` (a Hugging Face T5 tokenizer directory, or
    one written by `train_tokenizer`), else `tokenizer.json` (a Hugging Face model directory)."""
    directory = Path(directory)
    if (directory / MODEL_FILE).is_file():
        return tokenizer_from_proto((directory / MODEL_FILE).read_bytes())
    if (directory / HF_FILE).is_file():
        return tokenizer_from_proto(hf_proto(directory))
    raise FileNotFoundError(f"tokenizer: no {MODEL_FILE} or {HF_FILE} in {directory} (expected a "
                            "T5 SentencePiece tokenizer directory, one from train_tokenizer, or a "
                            "Hugging Face tokenizer directory)")


def hf_proto(directory: Path) -> bytes:
    """The `HFTokenizer` bytes of a directory with `tokenizer.json`: the eos and pad ids read
    from its side files (module docstring); none naming an EOS is an error."""
    text = (directory / HF_FILE).read_text(encoding="utf-8")
    tok = tokenizers.Tokenizer.from_str(text)
    eos, pad = _special_id(directory, tok, "eos"), _special_id(directory, tok, "pad")
    if eos is None:
        raise ValueError(f"tokenizer: {directory} names no EOS token (eos_token in "
                         "tokenizer_config.json or special_tokens_map.json, or eos_token_id in "
                         "config.json)")
    return json.dumps({"tokenizer": text, "eos_id": eos, "pad_id": eos if pad is None else pad}).encode()


def _special_id(directory: Path, tok: tokenizers.Tokenizer, kind: str) -> int | None:
    for name in SIDE_FILES:
        token = _read_json(directory / name).get(f"{kind}_token")
        if isinstance(token, dict):  # {"content": "</s>", "lstrip": ...}
            token = token.get("content")
        if token:
            token_id = tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"tokenizer: {directory / name}: {kind}_token {token!r} is not "
                                 f"in {directory / HF_FILE}")
            return token_id
    token_id = _read_json(directory / "config.json").get(f"{kind}_token_id")
    return token_id[0] if isinstance(token_id, list) else token_id


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer: {path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=4)
def tokenizer_from_proto(proto: bytes) -> Tokenizer:
    """The tokenizer for its bytes, built once per process (Ray workers call this). A
    SentencePiece model is a protobuf, which never starts with `{`; ours for tokenizer.json is
    JSON."""
    return HFTokenizer(proto) if proto.lstrip()[:1] == b"{" else Tokenizer(proto)


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
        pad_id=T5_PAD_ID, eos_id=T5_EOS_ID, unk_id=T5_UNK_ID, bos_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / MODEL_FILE).write_bytes(out.getvalue())
    return load_tokenizer(out_dir)
