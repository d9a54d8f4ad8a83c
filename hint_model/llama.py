"""The Llama block, which Mistral and Qwen2 share: RMSNorm, RoPE, SwiGLU, grouped-query
attention, no biases (Qwen2: on q/k/v). Mistral's sliding window only matters past its width,
so a Mistral model's max_position_embeddings is cut to it; Qwen2's (use_sliding_window) is
refused."""

from __future__ import annotations

from torch import Tensor, nn

from hint_model.causal import Block, CausalLM
from hint_model.checkpoint import CheckpointError, KeyMap
from hint_model.config import HintConfig
from hint_model.t5 import RMSNorm

MODEL_TYPES = ("llama", "mistral", "qwen2")


class Llama(CausalLM):
    rotary = True

    def __init__(self, cfg: HintConfig):
        super().__init__(cfg)
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, RMSNorm, qkv_bias=cfg.attention_bias, bias=False)
                                    for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.tokens(input_ids)

    def finish(self, x: Tensor) -> Tensor:
        return self.final_norm(x)


def config_fields(hf: dict, where) -> dict:
    """HintConfig fields of a Llama / Mistral / Qwen2 config.json."""
    model_type = hf["model_type"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{where}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} "
                              "is not supported (only the default RoPE)")
    if hf.get("mlp_bias") or (model_type == "llama" and hf.get("attention_bias")):
        raise CheckpointError(f"{where}: a Llama with biases on its MLP or on o_proj (mlp_bias / "
                              "attention_bias) is not supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise CheckpointError(f"{where}: Qwen2's sliding-window attention is not supported")
    heads = hf["num_attention_heads"]
    max_len = hf.get("max_position_embeddings", 2048)
    if model_type == "mistral" and hf.get("sliding_window"):
        max_len = min(max_len, hf["sliding_window"])
    return dict(
        model_type="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_heads=heads, d_kv=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_decoder_layers=0,
        feed_forward_proj=hf.get("hidden_act", "silu"),
        layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), max_position_embeddings=max_len,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        attention_bias=model_type == "qwen2",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def key_map(cfg: HintConfig) -> KeyMap:
    """Hugging Face name -> (our names, stored transposed)."""
    out = {"model.embed_tokens.weight": (("tokens.weight",), False),
           "model.norm.weight": (("final_norm.weight",), False)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head.weight",), False)
    parts = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn.o.weight", "mlp.gate_proj.weight": "ffn.gate.weight",
             "mlp.up_proj.weight": "ffn.up.weight", "mlp.down_proj.weight": "ffn.down.weight"}
    for target in "qkv":
        parts[f"self_attn.{target}_proj.weight"] = f"attn.{target}.weight"
        if cfg.attention_bias:
            parts[f"self_attn.{target}_proj.bias"] = f"attn.{target}.bias"
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{theirs}": ((f"blocks.{i}.{ours}",), False)
                    for theirs, ours in parts.items()})
    return out
