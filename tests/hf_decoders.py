"""Tiny random decoder-only checkpoints of every supported family, built in code with
transformers (the reference) and saved as Hugging Face directories (no hub here)."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig,
                          OPTConfig, Qwen2Config)

VOCAB = 97
_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_OPT = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_LLAMA, rope_theta=500.0),
    "llama-mha-tied": lambda: LlamaConfig(**{**_LLAMA, "num_key_value_heads": 4},
                                          tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_LLAMA, sliding_window=4096),
    "qwen2": lambda: Qwen2Config(**_LLAMA, tie_word_embeddings=True),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": lambda: OPTConfig(**_OPT),
    "opt-post-ln-proj": lambda: OPTConfig(**_OPT, do_layer_norm_before=False, word_embed_proj_dim=32),
    "opt-proj": lambda: OPTConfig(**_OPT, word_embed_proj_dim=32),
}


def reference(name: str, directory, seed: int = 0):
    """A transformers model of CONFIGS[name] with random weights (every parameter, norms and
    biases included, drawn wide enough that a wrong map shows), saved to `directory`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
            if param.dim() == 1:  # norms and biases: around their usual values
                param.add_(1.0 if torch.rand(()) < 0.5 else 0.0)
    model.save_pretrained(directory)
    return model


def right_padded(lengths: list[int], seed: int = 1, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max(lengths)] (never pad, bos or eos) and their right-padding mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask
