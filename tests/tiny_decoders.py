"""Tiny decoder-only checkpoints written in a test (no hub here): byte-level BPE tokenizers of
GPT-2's kind (one special token, `<|endoftext|>`, that ends sequences; no BOS, no pad) and OPT's
(`<s>` `<pad>` `</s>` `<unk>`, with `</s>` put before every sequence by the post-processor, as
OPT's tokenizer does), random GPT-2 / OPT / Llama models saved as transformers saves them, a lora_only HINT export
over such a Llama, and the check that a task's PEFT adapter runs as the HINT model runs the task."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from peft import PeftModel
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, OPTConfig, OPTForCausalLM)

from hint_model import HintModel
from hint_platform import export
from hint_platform.serving.predictor import CachedPredictor

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


def save_tiny_decoder(family: str, out: Path, vocab_size: int = 400, positions: int = 1024,
                      **config):
    """A random 2-layer GPT-2, OPT or Llama, 32 wide (Llama: 64, 4 heads, 2 key/value heads),
    with the special ids of train_byte_bpe's tokenizers (GPT-2: `<|endoftext|>` 0; OPT, and
    Llama with OPT's tokenizer: pad 1, BOS = EOS `</s>` 2), `config` overriding its Hugging Face
    config, saved in `out`."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=32,
                                           n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0, **config))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{
            **dict(vocab_size=vocab_size, max_position_embeddings=positions, hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, pad_token_id=1, bos_token_id=2, eos_token_id=2),
            **config}))
    else:
        model = OPTForCausalLM(OPTConfig(vocab_size=vocab_size, max_position_embeddings=positions,
                                         hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                         num_attention_heads=2, word_embed_proj_dim=32,
                                         pad_token_id=1, bos_token_id=2, eos_token_id=2))
    model.save_pretrained(out, safe_serialization=True)
    return model.eval()


def lora_only_llama(texts: Iterable[str], root: Path, max_hyper_len: int = 512) -> tuple[Path, Path]:
    """(a lora_only HINT export, its base): a tiny random Llama with an OPT-style tokenizer
    trained on `texts` (root/base) and a fresh hypernetwork over it (root/export), its generator's
    output layers scaled up so that the generated LoRA moves the logits well past 1e-4."""
    base = train_byte_bpe(texts, root / "base", "opt")
    save_tiny_decoder("llama", base)
    torch.manual_seed(0)
    model = HintModel.from_hf_checkpoint(base, variant="lora_only", lora_rank=8,
                                         max_hyper_len=max_hyper_len, max_target_len=6)
    with torch.no_grad():
        for mlp in model.generator.mlps.values():
            mlp.fc2.weight.mul_(30.0)
    return export.write(model, root / "export", base), base


def assert_peft_runs_the_task_as_hint(model_dir: Path, base: Path, adapter: Path, instruction: str):
    """PEFT over transformers' base gives the HINT model's logits for the task (fp32, 1e-4),
    and not the base's own."""
    predictor = CachedPredictor(model_dir, cache_mib=0, dtype="float32")
    ids = torch.tensor([predictor.reader.task_key(instruction)])
    modules = predictor.model.generate_modules(ids, torch.ones_like(ids))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    inputs = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 30, 11, 1, 1, 1]])
    mask = (inputs != 1).long()
    with torch.no_grad():
        ours = predictor.model(input_ids=inputs, attention_mask=mask, modules=modules).logits
        theirs = peft_model(input_ids=inputs, attention_mask=mask).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=inputs, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4
    assert (theirs[real] - plain[real]).abs().max() > 1e-2
