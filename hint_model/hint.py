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

from hint_model import checkpoint, decoding, peft, peft_export
from hint_model.config import (SIZE_PRESETS, VARIANT_PRESETS, HintConfig, HintConfigError,
                               variant_fields)
from hint_model.generator import SlotDecoder, StaticPeft, build_generator
from hint_model.loss import sequence_logprob
from hint_model.t5 import T5, Stack, padding_bias
from hint_model.task_modules import TaskModules


@dataclass
class HintOutput:
    logits: Tensor  # [B, L, vocab]
    loss: Tensor | None = None  # mean token cross-entropy over labels != -100


class HintModel(nn.Module):
    """HINT around a T5; `HintModel(cfg)` of a decoder-only cfg.model_type builds the
    decoder-only subclass (decoder_hint.DecoderHintModel), which registers itself here."""

    _decoder_only: type[HintModel] | None = None

    def __init_subclass__(cls, decoder_only: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if decoder_only:
            HintModel._decoder_only = cls

    def __new__(cls, cfg: HintConfig | None = None, *args, **kwargs):
        if cls is HintModel and cfg is not None and cfg.is_decoder_only:
            cls = HintModel._decoder_only
        return super().__new__(cls)

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
        hypernetwork return their static modules (or none) and ignore the inputs (a
        decoder-only one reads them as the instruction's key/value prefix)."""
        if not self._reads_instruction(hyper_input_ids):
            return self._static_modules()
        if hyper_input_ids is None or hyper_input_ids.shape[0] != 1:
            got = None if hyper_input_ids is None else tuple(hyper_input_ids.shape)
            raise ValueError(f"generate_modules takes one instruction (hyper_input_ids of shape "
                             f"[1, L]); got {got}")
        mask = _default_mask(hyper_input_ids, hyper_attention_mask)
        self._check_instructions(mask)
        return self._modules_for(hyper_input_ids, mask)

    def _reads_instruction(self, hyper_input_ids: Tensor | None) -> bool:
        """Whether this batch's instructions make modules (a T5 without a hypernetwork reads
        its instruction in the input, concatenated by the data)."""
        return self.config.hypernetwork

    def _check_instructions(self, mask: Tensor) -> None:
        """Per example of the batch: not empty, not longer than max_hyper_len."""
        lengths = mask.sum(1)
        if int(lengths.min()) == 0:
            raise ValueError(f"instruction of example {int(lengths.argmin())} is empty (all padding)")
        if int(lengths.max()) > self.config.max_hyper_len:
            row = int(lengths.argmax())
            raise ValueError(f"instruction of example {row} has {int(lengths[row])} tokens, more "
                             f"than HintConfig.max_hyper_len={self.config.max_hyper_len}")

    def _check_task_rows(self, ids: Tensor, task_index: Tensor, batch: int) -> None:
        """Instructions already grouped by task (one row each, `task_index` per example, as
        pipelines.collate makes them on the CPU). Only shapes are checked: reading a value
        here would wait for the device at every micro-batch."""
        if task_index.shape != (batch,):
            raise ValueError(f"task_index must hold one task row per example, [{batch}]; got "
                             f"shape {tuple(task_index.shape)}")
        if ids.shape[1] > self.config.max_hyper_len:
            raise ValueError(f"instructions are padded to {ids.shape[1]} tokens, more than "
                             f"HintConfig.max_hyper_len={self.config.max_hyper_len}")

    def _modules_for(self, ids: Tensor, mask: Tensor) -> TaskModules:
        """Encode instructions [T, L] (one per task) and generate their modules."""
        encoder = self.hyper_encoder if self.hyper_encoder is not None else self.t5.encoder
        x = self.t5.shared(ids)
        # Kept on purpose: padding is masked here. The reference runs the hyper-encoder without
        # a mask (hyper_network.py Hypernet.__call__: self.encoder(..., hyper=True)), but t5x
        # pads every instruction to the same fixed length, so there its modules still depend on
        # the instruction alone. We pad to the longest instruction of the batch: unmasked, a
        # task's modules would change with its batch (and differ between training and serving).
        states = encoder(x, padding_bias(mask, x.dtype))
        generated = self.generator(states, mask) if self.generator is not None else {}
        if self.config.fusion:
            return TaskModules(generated, *self._instruction_keys_values(states, generated), mask)
        return TaskModules(generated)

    def _instruction_keys_values(self, states: Tensor, generated: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The encoded instructions [T, M, d] projected by every decoder layer's cross-attention
        (with the task's LoRA on keys / values where it has one): [T, layers, M, inner] each.
        Done once per task, this is the part of the fused memory that no input changes."""
        index = torch.arange(states.shape[0], device=states.device)
        _, decoder_peft = peft.split_by_block(generated, index, self.config.num_layers,
                                              self.config.num_decoder_layers)
        keys, values = [], []
        for block, p in zip(self.t5.decoder.blocks, decoder_peft):
            key, value = block.instruction_keys_values(states, p.cross_attn)
            keys.append(key)
            values.append(value)
        return torch.stack(keys, dim=1), torch.stack(values, dim=1)

    def _static_modules(self) -> TaskModules:
        return TaskModules(self.static_peft() if self.static_peft is not None else {})

    def _condition(self, batch: int, device, hyper_input_ids: Tensor | None,
                   hyper_attention_mask: Tensor | None, modules: TaskModules | None,
                   task_index: Tensor | None = None) -> tuple[TaskModules, Tensor]:
        """The modules of this batch and, per example, the row of its task."""
        if modules is not None:
            if task_index is not None:
                if task_index.shape != (batch,) or int(task_index.max()) >= modules.num_tasks:
                    raise ValueError(f"task_index must be [{batch}] rows of the {modules.num_tasks} "
                                     f"tasks in modules; got {task_index.tolist()}")
                return modules, task_index.to(device)
            if modules.num_tasks != 1:
                raise ValueError(f"modules hold {modules.num_tasks} tasks; pass one task's modules "
                                 "or each example's task row as task_index")
            return modules, torch.zeros(batch, dtype=torch.long, device=device)
        if not self._reads_instruction(hyper_input_ids):
            return self._static_modules(), torch.zeros(batch, dtype=torch.long, device=device)
        if hyper_input_ids is None:
            raise ValueError(f"variant {self.config.variant!r} needs hyper_input_ids (the "
                             "instruction) or cached modules")
        mask = _default_mask(hyper_input_ids, hyper_attention_mask)
        if task_index is not None:
            self._check_task_rows(hyper_input_ids, task_index, batch)
            return self._modules_for(hyper_input_ids, mask), task_index.to(device)
        self._check_instructions(mask)
        # One generator call per UNIQUE instruction; padding is masked out of the comparison.
        # torch.unique waits for the device: the training batches come grouped instead.
        keyed = torch.where(mask.bool(), hyper_input_ids, -1)
        unique, index = torch.unique(keyed, dim=0, return_inverse=True)
        unique_mask = (unique != -1).to(mask.dtype)
        return self._modules_for(unique.clamp(min=0), unique_mask), index

    # ---- the input side ----

    def _encode(self, input_ids: Tensor, attention_mask: Tensor, modules: TaskModules,
                index: Tensor) -> tuple[Tensor, Tensor, list]:
        cfg = self.config
        encoder_peft, _ = peft.split_by_block(modules.peft, index, cfg.num_layers, cfg.num_decoder_layers)
        memory = self.t5.encode(input_ids, attention_mask, encoder_peft)
        return memory, attention_mask, self._decoder_peft(modules, index)

    def _decoder_peft(self, modules: TaskModules, index: Tensor) -> list:
        """Each decoder block's share of the modules; with fusion its cross-attention also
        gets the instruction's keys / values in front of the input's (the fused memory)."""
        cfg = self.config
        _, decoder_peft = peft.split_by_block(modules.peft, index, cfg.num_layers, cfg.num_decoder_layers)
        if modules.instruction_key is not None:
            peft.attach_memory(decoder_peft, modules.instruction_key, modules.instruction_value,
                               modules.instruction_mask, index)
        return decoder_peft

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                hyper_input_ids: Tensor | None = None, hyper_attention_mask: Tensor | None = None,
                modules: TaskModules | None = None, task_index: Tensor | None = None) -> HintOutput:
        """The instruction comes as `hyper_input_ids` (one row per example, grouped into tasks
        here; or, with `task_index` [B], one row per task as pipelines.collate batches it) or
        as cached `modules` (with `task_index` when they hold several tasks)."""
        attention_mask = _default_mask(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward needs labels or decoder_input_ids")
            decoder_input_ids = self.shift_right(labels)
        modules, index = self._condition(input_ids.shape[0], input_ids.device, hyper_input_ids,
                                         hyper_attention_mask, modules, task_index)
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
              hyper_attention_mask: Tensor | None = None, task_index: Tensor | None = None) -> Tensor:
        """[B] sum of log-probabilities of the labels (-100 ignored): rank classification."""
        logits = self(input_ids, attention_mask, labels=None, decoder_input_ids=self.shift_right(labels),
                      hyper_input_ids=hyper_input_ids, hyper_attention_mask=hyper_attention_mask,
                      modules=modules, task_index=task_index).logits
        return sequence_logprob(logits, labels)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 modules: TaskModules | None = None, hyper_input_ids: Tensor | None = None,
                 hyper_attention_mask: Tensor | None = None, max_new_tokens: int | None = None,
                 num_beams: int = 1, task_index: Tensor | None = None) -> Tensor:
        """Greedy (num_beams=1) or beam-search decoding: [B, <= max_new_tokens] new tokens (no
        start token), each row stopping at EOS and padded after it. max_new_tokens defaults to
        the model's target length (HintConfig.max_target_len). The decoder's cache holds the
        self-attention keys/values of the tokens so far and the cross-attention keys/values of
        the memory, made once; prefixes are prepended at attention time."""
        max_new_tokens = self._new_tokens(max_new_tokens, num_beams)
        attention_mask = _default_mask(input_ids, attention_mask)
        modules, index = self._condition(input_ids.shape[0], input_ids.device, hyper_input_ids,
                                         hyper_attention_mask, modules, task_index)
        memory, memory_mask, decoder_peft = self._encode(input_ids, attention_mask, modules, index)
        if num_beams > 1:  # every beam of an example shares its encoding and task rows
            memory = memory.repeat_interleave(num_beams, dim=0)
            memory_mask = memory_mask.repeat_interleave(num_beams, dim=0)
            decoder_peft = self._decoder_peft(modules, index.repeat_interleave(num_beams))
        cache = self.t5.new_cache()

        def step(token: Tensor) -> Tensor:
            return self.t5.decode(token, memory, memory_mask, decoder_peft, cache)[:, -1]

        def reorder(origin: Tensor) -> None:
            for block in cache:  # cross-attention rows are equal across an example's beams
                block["self"]["k"] = block["self"]["k"].index_select(0, origin)
                block["self"]["v"] = block["self"]["v"].index_select(0, origin)

        pad, eos, batch = self.config.pad_token_id, self.config.eos_token_id, input_ids.shape[0]
        if num_beams == 1:
            return decoding.greedy(step, batch, max_new_tokens, pad, eos, input_ids.device)
        return decoding.beam_search(step, reorder, batch, num_beams, max_new_tokens, pad, eos,
                                    input_ids.device)

    def _new_tokens(self, max_new_tokens: int | None, num_beams: int) -> int:
        max_new_tokens = self.config.max_target_len if max_new_tokens is None else max_new_tokens
        if num_beams < 1 or max_new_tokens < 0:
            raise ValueError(f"generate: num_beams must be >= 1 and max_new_tokens >= 0; got "
                             f"{num_beams}, {max_new_tokens}")
        return max_new_tokens

    # ---- files ----

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """config.json + model.safetensors. Pass `state_dict` when the model is sharded (a
        full state dict gathered by the caller)."""
        checkpoint.save_pretrained(self.config, state_dict or self.state_dict(), directory)

    def save_peft_adapter(self, modules: TaskModules, directory: str | Path,
                          base_model_name_or_path: str | None, provenance: dict[str, str]) -> Path:
        """One task's generated LoRA (a decoder-only `lora_only` model's TaskModules) as a PEFT
        adapter directory that `peft.PeftModel.from_pretrained` and vLLM load over the base;
        other variants and T5 are refused, saying why (peft_export.check_exportable).
        `provenance` (the instruction's SHA-256, the base's revision, the model's registry name
        / version or run id) is written to hint_provenance.json."""
        return peft_export.save_adapter(self.config, modules, directory, base_model_name_or_path,
                                        provenance)

    @classmethod
    def from_pretrained(cls, directory: str | Path, variant: str | None = None,
                        **overrides) -> "HintModel":
        """An export of this package, as saved; or, given `variant` and/or HintConfig
        `overrides`, the model they ask for around the export's weights (a `hint` export into
        `hint_no_fusion` or `adapters_only` to ablate it, an `adapters_only` one into `hint`;
        dropout_rate=0.1 to fine-tune a model pretrained at 0.0). The export's shapes stay
        unless overridden; the variant's switches replace the export's. Tensors the new model
        has no place for are dropped, parts the export lacks start fresh (an untied
        hyper-encoder or a decoder generator as the loaded T5, seed_from_t5), and
        `model.load_report` says which; a tensor of another shape is a CheckpointError."""
        cfg, state = checkpoint.read_pretrained(directory)
        where = Path(directory) / checkpoint.WEIGHTS
        if variant is None and not overrides:
            model = cls(cfg)
            checkpoint.load_strict(model, state, where)
            model.load_report = checkpoint.LoadReport()
            return model
        model = cls(as_variant(cfg, variant, overrides))
        report = checkpoint.load_matching(model, state, where)
        if any(k.startswith(("hyper_encoder.", "generator.decoder.")) for k in report.initialised):
            model.seed_from_t5()  # fresh parts start as the loaded T5 (see seed_from_t5) ...
            checkpoint.load_matching(model, state, where)  # ... loaded ones stay as loaded
        model.load_report = report
        return model

    @classmethod
    def plan_from_pretrained(cls, directory: str | Path, variant: str | None = None,
                             **overrides) -> tuple[HintConfig, checkpoint.LoadReport]:
        """What from_pretrained would build and load, checked without reading a weight (the
        model is built on the meta device): its config and the load report; raises as it would."""
        cfg, shapes = checkpoint.read_pretrained_shapes(directory)
        target = as_variant(cfg, variant, overrides)
        with torch.device("meta"):
            ours = {k: tuple(v.shape) for k, v in cls(target).state_dict().items()}
        return target, checkpoint.match_shapes(ours, shapes, Path(directory) / checkpoint.WEIGHTS)

    @classmethod
    def from_hf_checkpoint(cls, directory: str | Path, variant: str = "hint",
                           size: str | None = None, **overrides) -> "HintModel":
        """A Hugging Face checkpoint directory as the underlying model, by its config.json's
        model_type: t5 (from_t5_checkpoint), or a decoder-only family (gpt2, opt, llama,
        mistral, qwen2: DecoderHintModel.from_hf_decoder); the hypernetwork starts fresh. The
        config records the directory as the base (checkpoint.hf_base: a hub name from the hub's
        cache, else the absolute path), unless `overrides` name one."""
        name, revision = checkpoint.hf_base(directory)
        overrides = {"base_model_name_or_path": name, "base_revision": revision, **overrides}
        if checkpoint.read_json(directory).get("model_type") == "t5":
            return cls.from_t5_checkpoint(directory, variant, size, **overrides)
        return HintModel._decoder_only.from_hf_decoder(directory, variant, size, **overrides)

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
                             if "model_type" not in s and s["d_model"] == t5_fields["d_model"]), "small")
        cfg = HintConfig.preset(size, variant=variant, **{**t5_fields, **overrides})
        model = cls(cfg)
        checkpoint.load_t5_weights(model.t5, state, directory)
        model.seed_from_t5()
        return model


def as_variant(cfg: HintConfig, variant: str | None, overrides: dict) -> HintConfig:
    """`cfg` (an export's) as `variant` with `overrides`: its shapes kept, and for another
    variant the switches every variant preset sets back to their defaults, then that preset."""
    fields = cfg.to_dict()
    if variant is not None and variant != cfg.variant:
        if variant not in VARIANT_PRESETS:
            raise HintConfigError(f"unknown variant {variant!r}; valid: {', '.join(VARIANT_PRESETS)}")
        sizes = {k for preset in SIZE_PRESETS.values() for k in preset}
        switches = {k for preset in VARIANT_PRESETS.values() for k in preset} - sizes
        defaults = HintConfig()
        fields.update({k: getattr(defaults, k) for k in switches})
        fields.update(variant_fields(variant, fields["model_type"]), variant=variant)
    return HintConfig.from_dict({**fields, **overrides})


def _default_mask(ids: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ones_like(ids) if mask is None else mask
