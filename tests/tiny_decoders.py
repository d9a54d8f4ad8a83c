"""Tiny decoder-only checkpoints written in a test (no hub here): byte-level BPE tokenizers of
GPT-2's kind (one special token, `<|endoftext|>`, that ends sequences; no BOS, no pad) and OPT's
(`<s>` `<pad>` `</s>` `<unk>`, with `</s>` put before every sequence by the post-processor, as
OPT's tokenizer does), and random GPT-2 / OPT models saved as transformers saves them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

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


def save_tiny_decoder(family: str, out: Path, vocab_size: int = 400, positions: int = 1024):
    """A random 2-layer GPT-2 or OPT, 32 wide, with the special ids of train_byte_bpe's
    tokenizers (GPT-2: `<|endoftext|>` 0; OPT: pad 1, BOS = EOS `</s>` 2), saved in `out`."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=32,
                                           n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=vocab_size, max_position_embeddings=positions,
                                         hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                         num_attention_heads=2, word_embed_proj_dim=32,
                                         pad_token_id=1, bos_token_id=2, eos_token_id=2))
    model.save_pretrained(out, safe_serialization=True)
    return model.eval()
