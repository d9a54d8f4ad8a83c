"""Small byte-level BPE tokenizers trained in a test (no hub here): GPT-2's kind (one special
token, `<|endoftext|>`, that ends sequences; no BOS, no pad) and OPT's (`<s>` `<pad>` `</s>`
`<unk>`, with `</s>` put before every sequence by the post-processor, as OPT's tokenizer does)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL = {"gpt2": ["<|endoftext|>"], "opt": ["<s>", "<pad>", "</s>", "<unk>"]}


def train_byte_bpe(texts: Iterable[str], out_dir: Path, family: str = "gpt2", vocab_size: int = 400,
                   config: dict | None = None) -> Path:
    """Writes out_dir/tokenizer.json and tokenizer_config.json (`config`, default: the family's
    special tokens named as Hugging Face names them) and returns out_dir."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL[family], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family == "opt":
        tok.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if config is None:
        config = ({"eos_token": "<|endoftext|>"} if family == "gpt2" else
                  {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return out_dir


def sni_texts(sni_dir: Path) -> list[str]:
    """Definitions, inputs and outputs of the SNI sample's tasks: what the tokenizers learn."""
    texts = []
    for path in sorted((sni_dir / "tasks").glob("*.json")):
        task = json.loads(path.read_text())
        texts += task["Definition"]
        for example in (task.get("Positive Examples") or []) + task["Instances"][:20]:
            texts += [example["input"], example["output"] if isinstance(example["output"], str)
                      else " ".join(example["output"])]
    return texts
