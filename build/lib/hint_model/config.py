"""HintConfig: one dataclass for the underlying T5 and the hypernetwork around it.

Two kinds of named presets compose: a size preset (tiny ... xxl: the T5 shape and the PEFT
sizes) and a variant preset (hint, its ablations, and the baselines: which parts exist).
`HintConfig.preset("tiny", variant="hint", vocab_size=1000)` applies size, then variant, then
the overrides, and validates the result.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any


class HintConfigError(ValueError):
    """A config that does not validate; the message names the field and what is valid."""


@dataclass
class HintConfig:
    # --- underlying T5 (field names follow Hugging Face's T5Config where one exists) ---
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # head dim; inner attention width is num_heads * d_kv
    d_ff: int = 1024
    num_layers: int = 8  # encoder
    num_decoder_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"  # T5 v1.1; "relu" for T5 v1.0
    layer_norm_epsilon: float = 1e-6
    dropout_rate: float = 0.0
    # T5 v1.0 shares the embedding with the lm head and scales the decoder output by
    # d_model**-0.5 before it; v1.1 does neither. Two switches: checkpoints written by recent
    # `transformers` can be tied without the rescale.
    tie_word_embeddings: bool = False
    scale_decoder_outputs: bool = False
    pad_token_id: int = 0  # also the decoder start token
    eos_token_id: int = 1

    # --- the hypernetwork and what it generates ---
    variant: str = "hint"  # the variant preset this config came from (informational)
    hypernetwork: bool = True  # read the instruction at all (False: concat / static / no-instruct)
    generator: str = "component"  # component | decoder (HyperTune-like) | pooled (Hypter-like)
    generator_layers: int = 2  # depth of the "decoder" generator's T5 decoder stack
    # The generator's own shape, free so that a study can size it apart from the T5. Hidden
    # width of its 2-layer MLPs (one per parameter kind; "pooled": one per layer); None keeps
    # the paper's d_model ("pooled": Hypter's adapter_size).
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
    fusion: bool = True  # decoder cross-attends to [encoded instruction, encoded input]
    freeze_underlying: bool = False  # train the hypernetwork only (a tied hyper-encoder freezes too)
    max_hyper_len: int = 1024  # longest instruction (tokens) the model accepts

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def uses_peft(self) -> bool:
        return self.adapters or self.prefixes or self.lora

    @property
    def generator_hidden(self) -> int:
        """The generator MLPs' hidden width, generator_mlp_dim or its default."""
        if self.generator_mlp_dim is not None:
            return self.generator_mlp_dim
        return self.adapter_size if self.generator == "pooled" else self.d_model

    @property
    def num_slots(self) -> int:
        """Attention slots: each encoder layer, then per decoder layer its self and cross."""
        return self.num_layers + 2 * self.num_decoder_layers

    @classmethod
    def preset(cls, size: str = "tiny", variant: str = "hint", **overrides: Any) -> "HintConfig":
        if size not in SIZE_PRESETS:
            raise HintConfigError(f"unknown size preset {size!r}; valid: {', '.join(SIZE_PRESETS)}")
        if variant not in VARIANT_PRESETS:
            raise HintConfigError(
                f"unknown variant {variant!r}; valid: {', '.join(VARIANT_PRESETS)}")
        fields = {**SIZE_PRESETS[size], **VARIANT_PRESETS[variant], "variant": variant}
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
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise HintConfigError(f"HintConfig.{name}: expected "
                                      f"{getattr(expected, '__name__', expected)}, got {value!r}")
        positive = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                    "num_heads", "relative_attention_num_buckets",
                    "relative_attention_max_distance", "generator_layers", "adapter_size",
                    "prefix_length", "lora_rank", "max_hyper_len")
        for name in positive + ("generator_mlp_dim", "generator_heads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise HintConfigError(f"HintConfig.{name}: must be positive, got {value}")
        if self.feed_forward_proj not in ("gated-gelu", "relu"):
            raise HintConfigError(
                f"HintConfig.feed_forward_proj: {self.feed_forward_proj!r} is not one of "
                "gated-gelu, relu")
        if self.generator not in GENERATORS:
            raise HintConfigError(
                f"HintConfig.generator: {self.generator!r} is not one of {', '.join(GENERATORS)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise HintConfigError(f"HintConfig.dropout_rate: must be in [0, 1), got {self.dropout_rate}")
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
        if self.generator == "pooled" and (self.prefixes or self.lora) and self.hypernetwork:
            raise HintConfigError(
                "HintConfig.generator='pooled' (Hypter-like) generates adapters only; "
                "set prefixes=False and lora=False")


GENERATORS = ("component", "decoder", "pooled")

# T5 v1.1 shapes (google/t5-v1_1-*, LM-adapted); xl / xxl are the paper's HINT 3B / 11B.
SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
                 adapter_size=8, prefix_length=4, lora_rank=4, generator_layers=1),
    "small": dict(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8,
                  num_decoder_layers=8, adapter_size=64, prefix_length=10),
    "base": dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12,
                 num_decoder_layers=12, adapter_size=128, prefix_length=20),
    "large": dict(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24,
                  num_decoder_layers=24, adapter_size=256, prefix_length=30),
    "xl": dict(d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
               num_decoder_layers=24, adapter_size=512, prefix_length=30),
    "xxl": dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                num_decoder_layers=24, adapter_size=512, prefix_length=30),
}

_NO_HYPER = dict(hypernetwork=False, fusion=False)
_NO_PEFT = dict(adapters=False, prefixes=False, lora=False)

# Every ablation and baseline of the paper is one of these; fields not named keep the
# HintConfig defaults (the paper's HINT: component generator, adapters + prefixes, fusion).
VARIANT_PRESETS: dict[str, dict[str, Any]] = {
    "hint": {},
    "hint_no_fusion": dict(fusion=False),
    "hint_no_peft": dict(_NO_PEFT),  # fusion only
    "adapters_only": dict(prefixes=False),
    "prefixes_only": dict(adapters=False),
    "lora_only": dict(adapters=False, prefixes=False, lora=True),
    "generator_decoder": dict(generator="decoder"),
    "untied_encoder": dict(tied_hyper_encoder=False),
    "frozen_underlying": dict(freeze_underlying=True),
    "concat": dict(_NO_HYPER, **_NO_PEFT),  # T0 / Tk-Instruct: the data concatenates
    "static_peft": dict(_NO_HYPER),  # learned adapters + prefixes, one set for every task
    "no_instruct": dict(_NO_HYPER, **_NO_PEFT),  # the data drops the instruction
    "hypter": dict(generator="pooled", prefixes=False, fusion=False, adapter_size=8),
    "hypertune": dict(generator="decoder", fusion=False),
}
