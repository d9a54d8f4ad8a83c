"""OPT: learned positions offset by 2, LayerNorm, ReLU, biases everywhere, the head tied to
the token embedding. Pre-norm blocks with a final norm, or (do_layer_norm_before=False, as
OPT-350m) post-norm blocks without one; embeddings of word_embed_proj_dim projected in and
out of d_model when it differs (OPT-350m's 512 against 1024)."""

from __future__ import annotations

from torch import Tensor, nn

from hint_model.causal import Block, CausalLM
from hint_model.checkpoint import CheckpointError, KeyMap
from hint_model.config import HintConfig

MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2  # OPT's position table starts two rows in (a fairseq legacy)


class OPT(CausalLM):
    def __init__(self, cfg: HintConfig):
        super().__init__(cfg)
        width = embed_dim(cfg)
        self.tokens = nn.Embedding(cfg.vocab_size, width)
        self.positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model)
        self.project_in = nn.Linear(width, cfg.d_model, bias=False) if width != cfg.d_model else None
        self.project_out = nn.Linear(cfg.d_model, width, bias=False) if width != cfg.d_model else None
        self.blocks = nn.ModuleList(
            Block(cfg, nn.LayerNorm, qkv_bias=True, bias=True, post_norm=not cfg.do_layer_norm_before)
            for _ in range(cfg.num_layers))
        self.final_norm = (nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
                           if cfg.do_layer_norm_before else None)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(width, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.tokens(input_ids)
        x = x if self.project_in is None else self.project_in(x)
        return x + self.positions(positions + POSITION_OFFSET)

    def finish(self, x: Tensor) -> Tensor:
        x = x if self.final_norm is None else self.final_norm(x)
        return x if self.project_out is None else self.project_out(x)


def embed_dim(cfg: HintConfig) -> int:
    return cfg.word_embed_proj_dim or cfg.d_model


def config_fields(hf: dict, where) -> dict:
    """HintConfig fields of an OPT config.json."""
    for name in ("enable_bias", "layer_norm_elementwise_affine"):
        if not hf.get(name, True):
            raise CheckpointError(f"{where}: {name}=false is not supported")
    if hf.get("_remove_final_layer_norm"):
        raise CheckpointError(f"{where}: _remove_final_layer_norm is not supported")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    proj = hf.get("word_embed_proj_dim")
    return dict(model_type="opt", vocab_size=hf["vocab_size"], d_model=d, num_heads=heads,
                d_kv=d // heads, d_ff=hf["ffn_dim"], num_layers=hf["num_hidden_layers"],
                num_decoder_layers=0, max_position_embeddings=hf["max_position_embeddings"],
                feed_forward_proj=hf.get("activation_function", "relu"), layer_norm_epsilon=1e-5,
                do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
                word_embed_proj_dim=None if proj in (None, d) else proj,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))


def key_map(cfg: HintConfig) -> KeyMap:
    """Hugging Face name -> (our names, stored transposed)."""
    top = "model.decoder."
    out = {f"{top}embed_tokens.weight": (("tokens.weight",), False),
           f"{top}embed_positions.weight": (("positions.weight",), False)}
    if embed_dim(cfg) != cfg.d_model:
        out[f"{top}project_in.weight"] = (("project_in.weight",), False)
        out[f"{top}project_out.weight"] = (("project_out.weight",), False)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head.weight",), False)
    parts = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
             "self_attn.out_proj": "attn.o", "self_attn_layer_norm": "attn_norm",
             "fc1": "ffn.up", "fc2": "ffn.down", "final_layer_norm": "ffn_norm"}
    for part in ("weight", "bias"):
        if cfg.do_layer_norm_before:
            out[f"{top}final_layer_norm.{part}"] = ((f"final_norm.{part}",), False)
        for i in range(cfg.num_layers):
            out.update({f"{top}layers.{i}.{theirs}.{part}": ((f"blocks.{i}.{ours}.{part}",), False)
                        for theirs, ours in parts.items()})
    return out
