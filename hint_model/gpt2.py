"""GPT-2: learned positions, LayerNorm, GELU (tanh), pre-norm blocks, biases everywhere, the
head tied to the token embedding. Hugging Face stores its projections as Conv1D, weights
[in, out], and q, k, v fused in one c_attn: the key map transposes and splits them."""

from __future__ import annotations

from torch import Tensor, nn

from hint_model.causal import Block, CausalLM
from hint_model.checkpoint import CheckpointError, KeyMap
from hint_model.config import HintConfig

MODEL_TYPES = ("gpt2",)


class GPT2(CausalLM):
    def __init__(self, cfg: HintConfig):
        super().__init__(cfg)
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, nn.LayerNorm, qkv_bias=True, bias=True)
                                    for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.tokens(input_ids) + self.positions(positions)

    def finish(self, x: Tensor) -> Tensor:
        return self.final_norm(x)


def config_fields(hf: dict, where) -> dict:
    """HintConfig fields of a GPT-2 config.json."""
    unsupported = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                   "scale_attn_weights": True, "add_cross_attention": False}
    for name, default in unsupported.items():
        if hf.get(name, default) != default:
            raise CheckpointError(f"{where}: {name}={hf[name]!r} is not supported")
    d, heads = hf["n_embd"], hf["n_head"]
    return dict(model_type="gpt2", vocab_size=hf["vocab_size"], d_model=d, num_heads=heads,
                d_kv=d // heads, d_ff=hf.get("n_inner") or 4 * d, num_layers=hf["n_layer"],
                num_decoder_layers=0, max_position_embeddings=hf["n_positions"],
                feed_forward_proj=hf.get("activation_function", "gelu_new"),
                layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))


def key_map(cfg: HintConfig) -> KeyMap:
    """Hugging Face name -> (our names, stored transposed)."""
    out = {"transformer.wte.weight": (("tokens.weight",), False),
           "transformer.wpe.weight": (("positions.weight",), False)}
    for part in ("weight", "bias"):
        out[f"transformer.ln_f.{part}"] = ((f"final_norm.{part}",), False)
        for i in range(cfg.num_layers):
            theirs, ours = f"transformer.h.{i}.", f"blocks.{i}."
            out.update({
                f"{theirs}ln_1.{part}": ((f"{ours}attn_norm.{part}",), False),
                f"{theirs}ln_2.{part}": ((f"{ours}ffn_norm.{part}",), False),
                f"{theirs}attn.c_attn.{part}": (tuple(f"{ours}attn.{t}.{part}" for t in "qkv"), True),
                f"{theirs}attn.c_proj.{part}": ((f"{ours}attn.o.{part}",), True),
                f"{theirs}mlp.c_fc.{part}": ((f"{ours}ffn.up.{part}",), True),
                f"{theirs}mlp.c_proj.{part}": ((f"{ours}ffn.down.{part}",), True)})
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head.weight",), False)
    return out
