"""HintConfig: one dataclass for the underlying model and the hypernetwork around it.

The underlying model is a T5 (model_type "t5") or a decoder-only one ("gpt2", "opt", "llama";
Mistral and Qwen2 load as "llama"). Two kinds of named presets compose: a size preset (tiny ...
xxl: the T5 shape and the PEFT sizes; gpt2-xl, opt-13b, llama-*: a decoder-only shape) and a
variant preset (hint, its ablations, and the baselines: which parts exist).
`HintConfig.preset("tiny", variant="hint", vocab_size=1000)` applies size, then variant, then
the overrides, and validates the result.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


class HintConfigError(ValueError):
    """A config that does not validate; the message names the field and what is valid."""


@dataclass
class HintConfig:
    # --- underlying model (field names follow Hugging Face's configs where one exists) ---
    model_type: str = "t5"  # t5 | gpt2 | opt | llama (MODEL_TYPES)
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # head dim; inner attention width is num_heads * d_kv
    d_ff: int = 1024
    num_layers: int = 8  # T5: encoder; decoder-only: its layers
    num_decoder_layers: int = 8  # 0 for a decoder-only model
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # The FFN's activation, one of ACTIVATIONS[model_type]: T5 v1.1 "gated-gelu", v1.0 "relu";
    # gpt2 "gelu_new" (tanh) or "gelu"; opt "relu"; llama "silu" (always gated: SwiGLU).
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6
    # --- decoder-only models only ---
    num_key_value_heads: int | None = None  # grouped-query attention (llama); None: num_heads
    max_position_embeddings: int = 2048  # longest sequence (learned positions: their table)
    rope_theta: float = 10000.0  # llama's rotary base
    attention_bias: bool = False  # llama family: bias on q/k/v (Qwen2)
    do_layer_norm_before: bool = True  # opt: pre-LN; False: post-LN (OPT-350m)
    word_embed_proj_dim: int | None = None  # opt: embedding width, projected to d_model; None: d_model
    # Dropout is off unless a config asks (tests and the demo stay deterministic); the paper's
    # configs set the reference's. dropout_rate: the T5 stacks and the generator's attention,
    # the reference's DROPOUT_RATE, 0.1 fine-tuning (gins/t0.gin), 0.0 pretraining
    # (gins/pretrain.gin). generator_dropout_rate: between the two layers of each generator
    # MLP, which the reference never ties to DROPOUT_RATE: MlpBlock's default 0.1 in every stage
    # (modeling/layers.py MlpBlock; modeling/hyper_network.py `hypernetwork()` passes none).
    dropout_rate: float = 0.0
    generator_dropout_rate: float = 0.0
    # T5 v1.0 shares the embedding with the lm head and scales the decoder output by
    # d_model**-0.5 before it; v1.1 does neither. Two switches: checkpoints written by recent
    # `transformers` can be tied without the rescale.
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    pad_token_id: int = 0  # also the decoder start token
    eos_token_id: int = 1
    # The Hugging Face checkpoint the underlying model was built from (HintModel.from_hf_checkpoint:
    # a hub name, else its local path) and its revision; kept through exports and variants, and
    # named by the model's PEFT adapters (adapter_config.json's base_model_name_or_path).
    base_model_name_or_path: str | None = None
    base_revision: str | None = None

    # --- the hypernetwork and what it generates ---
    variant: str = "hint"  # the variant preset this config came from (informational)
    hypernetwork: bool = True  # read the instruction at all (False: concat / static / no-instruct)
    generator: str = "component"  # component | decoder (HyperTune-like) | pooled (Hypter-like)
    # Depth of the "decoder" generator: its layer i starts as the T5 decoder's layer i (minus
    # self-attention). None: every decoder layer, as the reference (modeling/hyper_network.py
    # HyperDecoder runs num_decoder_layers layers with hyper=True).
    generator_layers: int | None = None
    # The generator's own shape, free so that a study can size it apart from the T5. Hidden
    # width of its 2-layer MLPs (one per parameter kind); None keeps the reference's d_model
    # (hyper_network.py `hypernetwork()`: intermediate_dim=cfg.emb_dim, Hypter included).
    generator_mlp_dim: int | None = None
    # Heads of the "component" generator's cross-attention; None keeps d_model // d_kv.
    generator_heads: int | None = None
    tied_hyper_encoder: bool = True  # the hyper-encoder IS the T5 encoder; False: a copy
    adapters: bool = True
    adapter_size: int = 64
    prefixes: bool = True
    prefix_length: int = 10
    lora: bool = False
    lora_rank: int = 8
    # The attention projections LoRA adapts (q, k, v, o; each family maps them to its modules,
    # GPT-2's fused c_attn included). The paper's and Text-to-LoRA's choice: q and v.
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    fusion: bool = True  # decoder cross-attends to [encoded instruction, encoded input]
    freeze_underlying: bool = False  # train the hypernetwork only (a tied hyper-encoder freezes too)
    max_hyper_len: int = 1024  # longest instruction (tokens) the model accepts
    max_target_len: int = 256  # the output length it is trained for: generation's default

    @property
    def is_decoder_only(self) -> bool:
        return self.model_type != "t5"

    @property
    def caches_instruction(self) -> bool:
        """A decoder-only model without a hypernetwork that reads its instruction as a
        key/value prefix computed once per task (concat, static_peft; not no_instruct)."""
        return self.is_decoder_only and not self.hypernetwork and self.variant != "no_instruct"

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-") or self.model_type == "llama"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def kv_inner_dim(self) -> int:
        """Width of the keys / values (smaller than inner_dim under grouped-query attention)."""
        return self.kv_heads * self.d_kv

    @property
    def uses_peft(self) -> bool:
        return self.adapters or self.prefixes or self.lora

    @property
    def generator_hidden(self) -> int:
        """The generator MLPs' hidden width, generator_mlp_dim or its default d_model."""
        return self.d_model if self.generator_mlp_dim is None else self.generator_mlp_dim

    @property
    def generator_depth(self) -> int:
        """Layers of the "decoder" generator (generator_layers or every decoder layer)."""
        return self.num_decoder_layers if self.generator_layers is None else self.generator_layers

    @property
    def num_slots(self) -> int:
        """Attention slots: each encoder layer, then per decoder layer its self and cross (a
        decoder-only model: one per layer)."""
        return self.num_layers + 2 * self.num_decoder_layers

    @classmethod
    def preset(cls, size: str = "tiny", variant: str = "hint", **overrides: Any) -> "HintConfig":
        if size not in SIZE_PRESETS:
            raise HintConfigError(f"unknown size preset {size!r}; valid: {', '.join(SIZE_PRESETS)}")
        if variant not in VARIANT_PRESETS:
            raise HintConfigError(
                f"unknown variant {variant!r}; valid: {', '.join(VARIANT_PRESETS)}")
        model_type = {**SIZE_PRESETS[size], **overrides}.get("model_type", "t5")
        fields = {**SIZE_PRESETS[size], **variant_fields(variant, model_type), "variant": variant}
        return cls.from_dict({**fields, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HintConfig":
        valid = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise HintConfigError(
                f"unknown HintConfig field {unknown[0]!r}; valid: {', '.join(valid)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for name, expected in typing.get_type_hints(HintConfig).items():
            value = getattr(self, name)
            if typing.get_origin(expected) is list:
                if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    raise HintConfigError(f"HintConfig.{name}: expected a list of strings, got {value!r}")
                continue
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise HintConfigError(f"HintConfig.{name}: expected "
                                      f"{getattr(expected, '__name__', expected)}, got {value!r}")
        positive = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                    "num_key_value_heads", "max_position_embeddings", "word_embed_proj_dim", "relative_attention_num_buckets",
                    "relative_attention_max_distance", "generator_layers", "adapter_size",
                    "prefix_length", "lora_rank", "max_hyper_len", "max_target_len")
        for name in positive + ("generator_mlp_dim", "generator_heads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise HintConfigError(f"HintConfig.{name}: must be positive, got {value}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets or len(set(self.lora_targets)) < len(self.lora_targets):
            raise HintConfigError(
                f"HintConfig.lora_targets={self.lora_targets!r}: a non-empty list of distinct "
                f"names from {', '.join(LORA_TARGETS)}")
        self._validate_model_type()
        if self.generator not in GENERATORS:
            raise HintConfigError(
                f"HintConfig.generator: {self.generator!r} is not one of {', '.join(GENERATORS)}")
        for name in ("dropout_rate", "generator_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise HintConfigError(f"HintConfig.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.generator_depth > self.num_decoder_layers:
            raise HintConfigError(
                f"HintConfig.generator_layers={self.generator_layers}: the decoder generator's "
                f"layers start as the T5 decoder's, which has num_decoder_layers="
                f"{self.num_decoder_layers}")
        if self.fusion and not self.hypernetwork:
            raise HintConfigError("HintConfig.fusion needs hypernetwork=True (it fuses the instruction)")
        if self.generator_heads is not None and self.generator != "component":
            raise HintConfigError(
                f"HintConfig.generator_heads: only the component generator has its own heads; "
                f"generator={self.generator!r} would ignore it (set it to None)")
        if self.hypernetwork and self.generator == "component":
            if self.generator_heads is None and self.d_model % self.d_kv:
                raise HintConfigError(
                    f"HintConfig: the component generator's attention uses heads of "
                    f"d_kv={self.d_kv}, which must divide d_model={self.d_model} "
                    "(or set generator_heads)")
            if self.generator_heads is not None and self.d_model % self.generator_heads:
                raise HintConfigError(
                    f"HintConfig.generator_heads={self.generator_heads} must divide "
                    f"d_model={self.d_model}")
        if self.is_decoder_only and self.hypernetwork and self.generator == "decoder":
            raise HintConfigError(
                f"HintConfig.generator='decoder' starts as a T5 decoder's cross-attention layers; "
                f"a {self.model_type} model has none (use the component generator)")
        if (self.is_decoder_only and self.hypernetwork and self.uses_peft
                and (self.word_embed_proj_dim or self.d_model) != self.d_model):
            raise HintConfigError(
                f"HintConfig.word_embed_proj_dim={self.word_embed_proj_dim}: the generator reads "
                f"d_model={self.d_model} wide states, and this OPT's final states are projected "
                "to word_embed_proj_dim (a hypernetwork variant needs an OPT without it)")
        if self.generator == "pooled" and (self.prefixes or self.lora) and self.hypernetwork:
            raise HintConfigError(
                "HintConfig.generator='pooled' (Hypter-like) generates adapters only; "
                "set prefixes=False and lora=False")


    def _validate_model_type(self) -> None:
        """The fields whose valid values depend on the underlying model's family."""
        if self.model_type not in ACTIVATIONS:
            raise HintConfigError(f"HintConfig.model_type: {self.model_type!r} is not one of "
                                  f"{', '.join(ACTIVATIONS)}")
        if self.feed_forward_proj not in ACTIVATIONS[self.model_type]:
            raise HintConfigError(
                f"HintConfig.feed_forward_proj: {self.feed_forward_proj!r} is not one of "
                f"{', '.join(ACTIVATIONS[self.model_type])} (model_type {self.model_type!r})")
        if self.is_decoder_only != (self.num_decoder_layers == 0):
            raise HintConfigError(
                f"HintConfig.num_decoder_layers={self.num_decoder_layers}: must be 0 for a "
                f"decoder-only model and positive for a T5 (model_type {self.model_type!r})")
        if self.num_heads % self.kv_heads:
            raise HintConfigError(f"HintConfig.num_key_value_heads={self.num_key_value_heads} "
                                  f"must divide num_heads={self.num_heads}")
        if self.model_type in ("gpt2", "opt") and self.inner_dim != self.d_model:
            raise HintConfigError(f"HintConfig: {self.model_type} needs num_heads * d_kv == d_model; "
                                  f"got {self.num_heads} * {self.d_kv} != {self.d_model}")
        family_only = dict(num_key_value_heads=("llama", None), attention_bias=("llama", False),
                           do_layer_norm_before=("opt", True), word_embed_proj_dim=("opt", None))
        for name, (family, default) in family_only.items():
            if getattr(self, name) != default and self.model_type != family:
                raise HintConfigError(f"HintConfig.{name}={getattr(self, name)!r} is for "
                                      f"model_type {family!r} only (this is {self.model_type!r})")


# model_type -> the activations its FFN may have (feed_forward_proj)
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "t5": ("gated-gelu", "relu"), "gpt2": ("gelu_new", "gelu"), "opt": ("relu",), "llama": ("silu",)}
GENERATORS = ("component", "decoder", "pooled")
LORA_TARGETS = ("q", "k", "v", "o")  # the attention projections: query, key, value, output

# T5 v1.1 shapes (google/t5-v1_1-*, LM-adapted); xl / xxl are the paper's HINT 3B / 11B
# (gins/hyper_xl.gin, hyper_xxl.gin: adapters of 512, prefixes of 30; LoRA rank 512 as
# scripts/nat_int/ni_train_only_lora_no_fid.sh, lora_ranks="(512,None,512,None)").
SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
                 adapter_size=8, prefix_length=4, lora_rank=4),
    "small": dict(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8,
                  num_decoder_layers=8, adapter_size=64, prefix_length=10),
    "base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12,
                 num_decoder_layers=12, adapter_size=128, prefix_length=20),
    "large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24,
                  num_decoder_layers=24, adapter_size=256, prefix_length=30),
    "xl": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
               num_decoder_layers=24, adapter_size=512, prefix_length=30, lora_rank=512),
    "xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                num_decoder_layers=24, adapter_size=512, prefix_length=30, lora_rank=512),
    # Decoder-only shapes. gpt2-xl and opt-13b: the paper's Table 1 baselines (gpt2-xl and
    # facebook/opt-13b's config.json); the PEFT sizes are T5-large's (adapters, prefixes) and
    # Text-to-LoRA's rank 8.
    "gpt2-xl": dict(model_type="gpt2", vocab_size=50257, d_model=1600, d_kv=64, num_heads=25,
                    d_ff=6400, num_layers=48, num_decoder_layers=0, max_position_embeddings=1024,
                    feed_forward_proj="gelu_new", layer_norm_epsilon=1e-5,
                    tie_word_embeddings=True, pad_token_id=50256, eos_token_id=50256,
                    adapter_size=256, prefix_length=30, lora_rank=8),
    "opt-13b": dict(model_type="opt", vocab_size=50272, d_model=5120, d_kv=128, num_heads=40,
                    d_ff=20480, num_layers=40, num_decoder_layers=0, max_position_embeddings=2048,
                    feed_forward_proj="relu", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                    pad_token_id=1, eos_token_id=2, adapter_size=256, prefix_length=30, lora_rank=8),
    # Llama-style (RMSNorm, RoPE, SwiGLU, grouped-query attention): tiny for tests, small for
    # the demo's from-scratch decoder rows.
    "llama-tiny": dict(model_type="llama", d_model=64, d_kv=16, num_heads=4, num_key_value_heads=2,
                       d_ff=128, num_layers=2, num_decoder_layers=0, feed_forward_proj="silu",
                       adapter_size=8, prefix_length=4, lora_rank=4),
    "llama-small": dict(model_type="llama", d_model=256, d_kv=64, num_heads=4,
                        num_key_value_heads=2, d_ff=688, num_layers=4, num_decoder_layers=0,
                        feed_forward_proj="silu", adapter_size=32, prefix_length=8, lora_rank=8),
    # meta-llama/Llama-3.2-3B's config.json (its llama3 RoPE scaling aside: it only matters past
    # 8k tokens): the decoder-only base in T5-XL's role, 3B on one GPU (bench/decoder_lora_step.py).
    # Llama 3 has no pad token: its EOS pads. PEFT sizes as gpt2-xl's.
    "llama-3b": dict(model_type="llama", vocab_size=128256, d_model=3072, d_kv=128, num_heads=24,
                     num_key_value_heads=8, d_ff=8192, num_layers=28, num_decoder_layers=0,
                     max_position_embeddings=131072, rope_theta=500000.0, feed_forward_proj="silu",
                     layer_norm_epsilon=1e-5, tie_word_embeddings=True, pad_token_id=128001,
                     eos_token_id=128001, adapter_size=256, prefix_length=30, lora_rank=8),
}

_NO_HYPER = dict(hypernetwork=False, fusion=False)
_NO_PEFT = dict(adapters=False, prefixes=False, lora=False)

# Every ablation and baseline of the paper is one of these; fields not named keep the
# HintConfig defaults (the paper's HINT: component generator, adapters + prefixes, fusion).
# Paths are in the reference repository allenai/hyper-task-descriptions.
VARIANT_PRESETS: dict[str, dict[str, Any]] = {
    "hint": {},
    "hint_no_fusion": dict(fusion=False),
    "hint_no_peft": dict(_NO_PEFT),  # fusion only
    # Section 6.3's PEFT ablations run without fusion: scripts/nat_int/ni_train_only_*_no_fid.sh
    # (use_fusion_in_decoder=False). LoRA on q and v at the size preset's rank (512 at xl);
    # "_smaller" is ni_train_only_lora_no_fid_smaller.sh's rank 128.
    "adapters_only": dict(prefixes=False, fusion=False),
    "prefixes_only": dict(adapters=False, fusion=False),
    "lora_only": dict(_NO_PEFT, lora=True, fusion=False),
    "lora_only_smaller": dict(_NO_PEFT, lora=True, fusion=False, lora_rank=128),
    "generator_decoder": dict(generator="decoder"),
    "untied_encoder": dict(tied_hyper_encoder=False),
    "frozen_underlying": dict(freeze_underlying=True),
    "concat": dict(_NO_HYPER, **_NO_PEFT),  # T0 / Tk-Instruct: the data concatenates
    "static_peft": dict(_NO_HYPER),  # learned adapters + prefixes, one set for every task
    "no_instruct": dict(_NO_HYPER, **_NO_PEFT),  # the data drops the instruction
    # gins/hypter.gin: adapters of 8 only, no fusion, layer_embedding_method="none" (the
    # mean-pooled instruction), per_layer_hnet (one MLP per parameter kind whose output spans
    # every layer), share_hnet_encoder=False. Kept on purpose: the untied hyper-encoder starts
    # as the T5 encoder (Hypter reads with a pretrained encoder); the reference's run restores no
    # `hyper` weight (gins/restore_pretrained.gin), which leaves its hyper-encoder random.
    "hypter": dict(generator="pooled", adapters=True, adapter_size=8, prefixes=False, lora=False,
                   fusion=False, tied_hyper_encoder=False),
    # gins/hypertune.gin (prefixes only, no fusion, layer_embedding_method="decoder": the
    # generator is a T5 decoder started from the pretrained one) on gins/instruction_embed.gin
    # (share_hnet_encoder=True), with gins/train_only_hnet.gin (only `.*hyper.*` trains: the
    # shared encoder and the underlying T5 stay frozen).
    "hypertune": dict(generator="decoder", adapters=False, prefixes=True, lora=False, fusion=False,
                      tied_hyper_encoder=True, freeze_underlying=True),
}

# On a decoder-only base HINT also generates LoRA (Text-to-LoRA's q / v, cfg.lora_targets)
# beside the paper's adapters and prefixes: the variants that keep the paper's PEFT kinds.
DECODER_ONLY_LORA = ("hint", "hint_no_fusion", "untied_encoder", "frozen_underlying")


def variant_fields(variant: str, model_type: str) -> dict[str, Any]:
    """The fields variant preset `variant` sets on a model of `model_type`."""
    fields = dict(VARIANT_PRESETS[variant])
    if model_type != "t5" and variant in DECODER_ONLY_LORA:
        fields["lora"] = True
    return fields
