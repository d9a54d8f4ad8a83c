"""HintModel: hyper-encoder + parameter generator + the underlying T5, tied together.

Per batch: the instruction of each UNIQUE task is encoded (by the T5 encoder itself, weights
tied, with no PEFT) and turned into modules once; every example then gets its task's modules
by index (batched matmuls, see peft.py). The same path serves cached TaskModules, static PEFT
(one learned task) and the baselines that read no instruction at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hint_model import checkpoint, peft
from hint_model.config import SIZE_PRESETS, HintConfig
from hint_model.generator import SlotDecoder, StaticPeft, build_generator
from hint_model.t5 import T5, Stack, padding_bias
from hint_model.task_modules import TaskModules


@dataclass
class HintOutput:
    logits: Tensor  # [B, L, vocab]
    loss: Tensor | None = None  # mean token cross-entropy over labels != -100


class HintModel(nn.Module):
    def __init__(self, cfg: HintConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.t5 = T5(cfg)
        self.t5.init_weights()
        untied = cfg.hypernetwork and not cfg.tied_hyper_encoder
        self.hyper_encoder = Stack(cfg, is_decoder=False, num_layers=cfg.num_layers) if untied else None
        self.generator = build_generator(cfg) if cfg.hypernetwork and cfg.uses_peft else None
        self.static_peft = StaticPeft(cfg) if not cfg.hypernetwork and cfg.uses_peft else None
        self.seed_from_t5()
        self.t5.requires_grad_(not cfg.freeze_underlying)

    # ---- structure, for the training platform ----

    def blocks(self) -> list[nn.Module]:
        """Every T5 block (encoder, decoder, hyper-encoder, the decoder generator's layers): the
        units to wrap with fully_shard and to checkpoint."""
        return [block for stack in self._stacks() for block in stack.blocks]

    def set_activation_checkpointing(self, on: bool) -> None:
        for stack in self._stacks():
            stack.checkpointing = on

    def seed_from_t5(self) -> None:
        """The hypernetwork parts that start as the T5: an untied hyper-encoder as a copy of its
        encoder (gins/separate_henc.gin), the decoder generator's layers as its decoder's
        (gins/hypertune.gin). Run at construction and again once a T5 checkpoint is loaded."""
        if self.hyper_encoder is not None:
            self.hyper_encoder.load_state_dict(self.t5.encoder.state_dict())
        if self.generator is not None and isinstance(getattr(self.generator, "decoder", None), SlotDecoder):
            self.generator.decoder.copy_from(self.t5.decoder)

    def _stacks(self) -> list[Stack | SlotDecoder]:
        return [m for m in self.modules() if isinstance(m, (Stack, SlotDecoder))]

    # ---- the task side ----

    def generate_modules(self, hyper_input_ids: Tensor | None = None,
                         hyper_attention_mask: Tensor | None = None) -> TaskModules:
        """The modules of ONE task (hyper inputs of batch size 1). Variants without a
        hypernetwork return their static modules (or none) and ignore the inputs."""
        if not self.config.hypernetwork:
            return self._static_modules()
        if hyper_input_ids is None or hyper_input_ids.shape[0] != 1:
            got = None if hyper_input_ids is None else tuple(hyper_input_ids.shape)
            raise ValueError(f"generate_modules takes one instruction (hyper_input_ids of shape "
                             f"[1, L]); got {got}")
        mask = _default_mask(hyper_input_ids, hyper_attention_mask)
        self._check_instructions(mask)
        return self._modules_for(hyper_input_ids, mask)

    def _check_instructions(self, mask: Tensor) -> None:
        """Per example of the batch: not empty, not longer than max_hyper_len."""
        lengths = mask.sum(1)
        if int(lengths.min()) == 0:
            raise ValueError(f"instruction of example {int(lengths.argmin())} is empty (all padding)")
        if int(lengths.max()) > self.config.max_hyper_len:
            row = int(lengths.argmax())
            raise ValueError(f"instruction of example {row} has {int(lengths[row])} tokens, more "
                             f"than HintConfig.max_hyper_len={self.config.max_hyper_len}")

    def _modules_for(self, ids: Tensor, mask: Tensor) -> TaskModules:
        """Encode instructions [T, L] (one per task) and generate their modules."""
        encoder = self.hyper_encoder if self.hyper_encoder is not None else self.t5.encoder
        x = self.t5.shared(ids)
        # Kept on purpose: padding is masked here. The reference runs the hyper-encoder without
        # a mask (hyper_network.py Hypernet.__call__: self.encoder(..., hyper=True)), so a
        # task's modules would depend on how much padding its batch had.
        states = encoder(x, padding_bias(mask, x.dtype))
        generated = self.generator(states, mask) if self.generator is not None else {}
        if self.config.fusion:
            return TaskModules(generated, states, mask)
        return TaskModules(generated)

    def _static_modules(self) -> TaskModules:
        return TaskModules(self.static_peft() if self.static_peft is not None else {})

    def _condition(self, batch: int, device, hyper_input_ids: Tensor | None,
                   hyper_attention_mask: Tensor | None,
                   modules: TaskModules | None) -> tuple[TaskModules, Tensor]:
        """The modules of this batch and, per example, the row of its task."""
        if modules is not None:
            if modules.num_tasks != 1:
                raise ValueError(f"modules hold {modules.num_tasks} tasks; pass one task's modules")
            return modules, torch.zeros(batch, dtype=torch.long, device=device)
        if not self.config.hypernetwork:
            return self._static_modules(), torch.zeros(batch, dtype=torch.long, device=device)
        if hyper_input_ids is None:
            raise ValueError(f"variant {self.config.variant!r} needs hyper_input_ids (the "
                             "instruction) or cached modules")
        mask = _default_mask(hyper_input_ids, hyper_attention_mask)
        self._check_instructions(mask)
        # One generator call per UNIQUE instruction; padding is masked out of the comparison.
        keyed = torch.where(mask.bool(), hyper_input_ids, -1)
        unique, index = torch.unique(keyed, dim=0, return_inverse=True)
        unique_mask = (unique != -1).to(mask.dtype)
        return self._modules_for(unique.clamp(min=0), unique_mask), index

    # ---- the input side ----

    def _encode(self, input_ids: Tensor, attention_mask: Tensor, modules: TaskModules,
                index: Tensor) -> tuple[Tensor, Tensor, list]:
        cfg = self.config
        encoder_peft, decoder_peft = peft.split_by_block(modules.peft, index, cfg.num_layers,
                                                         cfg.num_decoder_layers)
        memory = self.t5.encode(input_ids, attention_mask, encoder_peft)
        memory_mask = attention_mask
        if modules.instruction_states is not None:  # instruction fusion
            states = peft.per_example(modules.instruction_states, index, memory)
            states_mask = modules.instruction_mask
            states_mask = states_mask if states_mask.shape[0] == 1 else states_mask.index_select(0, index)
            batch = memory.shape[0]
            memory = torch.cat([states.expand(batch, -1, -1), memory], dim=1)
            memory_mask = torch.cat([states_mask.expand(batch, -1).to(attention_mask.dtype),
                                     attention_mask], dim=1)
        return memory, memory_mask, decoder_peft

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                hyper_input_ids: Tensor | None = None, hyper_attention_mask: Tensor | None = None,
                modules: TaskModules | None = None) -> HintOutput:
        attention_mask = _default_mask(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs labels or decoder_input_ids")
            decoder_input_ids = self.shift_right(labels)
        modules, index = self._condition(input_ids.shape[0], input_ids.device, hyper_input_ids,
                                         hyper_attention_mask, modules)
        memory, memory_mask, decoder_peft = self._encode(input_ids, attention_mask, modules, index)
        logits = self.t5.decode(decoder_input_ids, memory, memory_mask, decoder_peft)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return HintOutput(logits=logits, loss=loss)

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs: the start token (pad) then the labels, -100 read as pad."""
        start = torch.full_like(labels[:, :1], self.config.pad_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def score(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
              modules: TaskModules | None = None, hyper_input_ids: Tensor | None = None,
              hyper_attention_mask: Tensor | None = None) -> Tensor:
        """[B] sum of log-probabilities of the labels (-100 ignored): rank classification."""
        logits = self(input_ids, attention_mask, labels=None, decoder_input_ids=self.shift_right(labels),
                      hyper_input_ids=hyper_input_ids, hyper_attention_mask=hyper_attention_mask,
                      modules=modules).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (labels != -100)).sum(1)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 modules: TaskModules | None = None, hyper_input_ids: Tensor | None = None,
                 hyper_attention_mask: Tensor | None = None, max_new_tokens: int = 32) -> Tensor:
        """Greedy decoding: [B, <= max_new_tokens] new tokens (no start token), each row
        stopping at EOS and padded after it. The cache holds real tokens only; prefixes are
        prepended at attention time."""
        attention_mask = _default_mask(input_ids, attention_mask)
        modules, index = self._condition(input_ids.shape[0], input_ids.device, hyper_input_ids,
                                         hyper_attention_mask, modules)
        memory, memory_mask, decoder_peft = self._encode(input_ids, attention_mask, modules, index)
        cache = self.t5.new_cache()
        pad, eos = self.config.pad_token_id, self.config.eos_token_id
        token = torch.full_like(input_ids[:, :1], pad)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        out = []
        for _ in range(max_new_tokens):
            logits = self.t5.decode(token, memory, memory_mask, decoder_peft, cache)[:, -1]
            token = logits.argmax(-1).masked_fill(done, pad).unsqueeze(1)
            out.append(token)
            done |= token.squeeze(1) == eos
            if bool(done.all()):
                break
        return torch.cat(out, dim=1) if out else input_ids[:, :0]

    # ---- files ----

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """config.json + model.safetensors. Pass `state_dict` when the model is sharded (a
        full state dict gathered by the caller)."""
        checkpoint.save_pretrained(self.config, state_dict or self.state_dict(), directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides) -> "HintModel":
        """An export of this package. `overrides` change HintConfig fields that leave the
        weights as they are, e.g. dropout_rate=0.1 to fine-tune a model pretrained at 0.0."""
        cfg, state = checkpoint.read_pretrained(directory)
        cfg = HintConfig.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg
        model = cls(cfg)
        checkpoint.load_strict(model, state, Path(directory) / checkpoint.WEIGHTS)
        return model

    @classmethod
    def from_t5_checkpoint(cls, directory: str | Path, variant: str = "hint",
                           size: str | None = None, **overrides) -> "HintModel":
        """A Hugging Face T5 checkpoint (config.json + safetensors, sharded or not) as the
        underlying model; the hypernetwork starts fresh. The T5 shape comes from the
        checkpoint; `size` only supplies the PEFT sizes (adapter, prefix, rank): by default
        the size preset of the same d_model, else "small". An untied hyper-encoder and the
        decoder generator's layers start as the checkpoint's encoder / decoder (seed_from_t5)."""
        t5_fields, state = checkpoint.read_t5_checkpoint(directory)
        size = size or next((name for name, s in SIZE_PRESETS.items()
                             if s["d_model"] == t5_fields["d_model"]), "small")
        cfg = HintConfig.preset(size, variant=variant, **{**t5_fields, **overrides})
        model = cls(cfg)
        checkpoint.load_t5_weights(model.t5, state, directory)
        model.seed_from_t5()
        return model


def _default_mask(ids: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ones_like(ids) if mask is None else mask
