"""DecoderHintModel: HintModel on a decoder-only underlying model (gpt2.py, opt.py, llama.py).

`HintModel(cfg)` returns one when cfg.model_type is decoder-only. Batches are causal
(pipelines.collate(causal=True)): `input_ids` is the prompt followed by the target, and
`labels[:, j]` is the token that follows `input_ids[:, j]`, so logits and labels align as a
T5's do. Without a hypernetwork the instruction, when given as `hyper_input_ids` (the concat
baseline; No-Instruct reads none), is the prompt's prefix: each layer's keys / values of it are
computed once per task (`generate_modules`, TaskModules.instruction_key / value
[T, layers, M, kv_inner]) and every input attends to them, its positions continuing after the
instruction. The hypernetwork variants on a decoder-only base are issue 20's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hint_model import checkpoint, decoding, gpt2, llama, opt, peft
from hint_model.causal import CausalLM
from hint_model.config import SIZE_PRESETS, HintConfig, HintConfigError
from hint_model.generator import StaticPeft
from hint_model.hint import HintModel, HintOutput, _default_mask
from hint_model.loss import sequence_logprob
from hint_model.task_modules import TaskModules

FAMILIES = {"gpt2": gpt2, "opt": opt, "llama": llama}
# config.json model_type -> the family that loads it
HF_MODEL_TYPES = {name: family for family in FAMILIES.values() for name in family.MODEL_TYPES}
MODEL_CLASSES: dict[str, type[CausalLM]] = {"gpt2": gpt2.GPT2, "opt": opt.OPT, "llama": llama.Llama}


class DecoderHintModel(HintModel, decoder_only=True):
    def __init__(self, cfg: HintConfig):
        nn.Module.__init__(self)
        cfg.validate()
        if cfg.hypernetwork:
            raise HintConfigError(
                f"variant {cfg.variant!r} needs a hypernetwork, which a {cfg.model_type} base does "
                "not have yet (issue 20); decoder-only variants: concat, no_instruct, static_peft")
        self.config = cfg
        self.base = MODEL_CLASSES[cfg.model_type](cfg)
        self.base.init_weights()
        self.hyper_encoder = self.generator = None
        self.static_peft = StaticPeft(cfg) if cfg.uses_peft else None
        self.base.requires_grad_(not cfg.freeze_underlying)

    def blocks(self) -> list[nn.Module]:
        """Every decoder block: the units to wrap with fully_shard and to checkpoint."""
        return list(self.base.blocks)

    def set_activation_checkpointing(self, on: bool) -> None:
        self.base.checkpointing = on

    # ---- the task side ----

    def _reads_instruction(self, hyper_input_ids: Tensor | None) -> bool:
        return self.config.hypernetwork or (hyper_input_ids is not None and self.config.caches_instruction)

    def _modules_for(self, ids: Tensor, mask: Tensor) -> TaskModules:
        """Instructions [T, M] (one per task) -> each layer's keys / values of them, read with
        the static modules an input gets too (so that prefix + input == the concatenation)."""
        static = self._static_modules().peft
        tasks = ids.shape[0]
        blocks = peft.split_by_layer(static, torch.zeros(tasks, dtype=torch.long, device=ids.device),
                                     self.config.num_layers)
        _, key, value = self.read_instruction(ids, mask, blocks)
        return TaskModules({k: v.expand(tasks, *v.shape[1:]) for k, v in static.items()},
                           key, value, mask)

    def read_instruction(self, ids: Tensor, mask: Tensor, blocks: list | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the base causally over instructions [T, M] (right-padded, from position 0):
        (final states [T, M, d], keys and values [T, layers, M, kv_inner] of every layer)."""
        cache = self.base.new_cache()
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        states = self.base(ids, positions, mask, blocks, cache)
        key, value = ([layer[name].transpose(1, 2).flatten(2) for layer in cache] for name in "kv")
        return states, torch.stack(key, dim=1), torch.stack(value, dim=1)

    # ---- the input side ----

    def _layer_peft(self, modules: TaskModules, index: Tensor) -> list:
        """Each layer's share of the modules, with the instruction's keys / values in front."""
        blocks = peft.split_by_layer(modules.peft, index, self.config.num_layers)
        if modules.instruction_key is not None:
            peft.attach_prefix(blocks, modules.instruction_key, modules.instruction_value,
                               modules.instruction_mask, index)
        return blocks

    def _positions(self, modules: TaskModules, index: Tensor, input_ids: Tensor,
                   new_tokens: int = 0) -> Tensor:
        """[B, L]: an input after its task's instruction starts at the instruction's length.
        Checked by shapes (no wait for the device) against the positions the model has, with
        `new_tokens` more to generate."""
        width = 0 if modules.instruction_mask is None else modules.instruction_mask.shape[1]
        if width + input_ids.shape[1] + new_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"instruction ({width}) + input ({input_ids.shape[1]}) + new tokens ({new_tokens}) "
                f"exceed HintConfig.max_position_embeddings={self.config.max_position_embeddings}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        if modules.instruction_mask is None:
            return positions
        return positions + modules.instruction_mask.sum(1).index_select(0, index)[:, None]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                hyper_input_ids: Tensor | None = None, hyper_attention_mask: Tensor | None = None,
                modules: TaskModules | None = None, task_index: Tensor | None = None) -> HintOutput:
        """Logits [B, L, vocab] of a causal batch (labels[:, j] follows input_ids[:, j])."""
        if decoder_input_ids is not None:
            raise ValueError("a decoder-only model takes no decoder_input_ids: input_ids holds "
                             "the prompt and the target (pipelines.collate(causal=True))")
        attention_mask = _default_mask(input_ids, attention_mask)
        modules, index = self._condition(input_ids.shape[0], input_ids.device, hyper_input_ids,
                                         hyper_attention_mask, modules, task_index)
        states = self.base(input_ids, self._positions(modules, index, input_ids), attention_mask,
                           self._layer_peft(modules, index))
        logits = self.base.logits(states)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return HintOutput(logits=logits, loss=loss)

    def _prefill(self, input_ids: Tensor, attention_mask: Tensor, modules: TaskModules,
                 index: Tensor, blocks: list, cache: list[dict], new_tokens: int) -> tuple[Tensor, Tensor]:
        """Run right-padded prompts into `cache`: (each row's states at its last real token
        [B, d], the position its next token takes [B])."""
        positions = self._positions(modules, index, input_ids, new_tokens)
        states = self.base(input_ids, positions, attention_mask, blocks, cache)
        rows, last = torch.arange(input_ids.shape[0], device=input_ids.device), attention_mask.sum(1) - 1
        return states[rows, last], positions[rows, last] + 1

    def score(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
              modules: TaskModules | None = None, hyper_input_ids: Tensor | None = None,
              hyper_attention_mask: Tensor | None = None, task_index: Tensor | None = None) -> Tensor:
        """[B] sum of log p(labels | prompt): input_ids the right-padded prompts, labels the
        targets (-100 after each one's end). The targets continue each prompt on its cache."""
        modules, index = self._condition(input_ids.shape[0], input_ids.device, hyper_input_ids,
                                         hyper_attention_mask, modules, task_index)
        blocks, cache = self._layer_peft(modules, index), self.base.new_cache()
        last, start = self._prefill(input_ids, attention_mask, modules, index, blocks, cache,
                                    labels.shape[1])
        states = [last[:, None]]
        if labels.shape[1] > 1:
            given = labels[:, :-1]
            positions = start[:, None] + torch.arange(given.shape[1], device=labels.device)
            key_mask = torch.cat([attention_mask, (given != -100).to(attention_mask.dtype)], dim=1)
            states.append(self.base(given.clamp(min=0), positions, key_mask, blocks, cache))
        return sequence_logprob(self.base.logits(torch.cat(states, dim=1)), labels)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 modules: TaskModules | None = None, hyper_input_ids: Tensor | None = None,
                 hyper_attention_mask: Tensor | None = None, max_new_tokens: int | None = None,
                 num_beams: int = 1, task_index: Tensor | None = None) -> Tensor:
        """Greedy or beam search after right-padded prompts, each row continuing from its own
        length: [B, <= max_new_tokens] new tokens, stopping at EOS and padded after it. The
        cache holds the prompt's keys / values (its padding masked) and the new tokens'."""
        max_new_tokens = self._new_tokens(max_new_tokens, num_beams)
        attention_mask = _default_mask(input_ids, attention_mask)
        modules, index = self._condition(input_ids.shape[0], input_ids.device, hyper_input_ids,
                                         hyper_attention_mask, modules, task_index)
        blocks, cache = self._layer_peft(modules, index), self.base.new_cache()
        last, position = self._prefill(input_ids, attention_mask, modules, index, blocks, cache,
                                       max_new_tokens)
        first, key_mask = self.base.logits(last), attention_mask
        if num_beams > 1:  # an example's beams share its prompt: its rows repeated
            first, position, key_mask = (t.repeat_interleave(num_beams, dim=0)
                                         for t in (first, position, key_mask))
            for layer in cache:
                layer["k"], layer["v"] = (layer[n].repeat_interleave(num_beams, dim=0) for n in "kv")
            blocks = self._layer_peft(modules, index.repeat_interleave(num_beams))
        pending = [first]

        def step(token: Tensor) -> Tensor:
            """The prompt's logits first (the start token is not read), then one token further."""
            nonlocal key_mask, position
            if pending:
                return pending.pop()
            key_mask = F.pad(key_mask, (0, 1), value=1)
            states = self.base(token, position[:, None], key_mask, blocks, cache)
            position = position + 1
            return self.base.logits(states[:, -1])

        def reorder(origin: Tensor) -> None:  # positions and masks are equal across a row's beams
            for layer in cache:
                layer["k"], layer["v"] = (layer[n].index_select(0, origin) for n in "kv")

        pad, eos, batch = self.config.pad_token_id, self.config.eos_token_id, input_ids.shape[0]
        if num_beams == 1:
            return decoding.greedy(step, batch, max_new_tokens, pad, eos, input_ids.device)
        return decoding.beam_search(step, reorder, batch, num_beams, max_new_tokens, pad, eos,
                                    input_ids.device)

    # ---- files ----

    @classmethod
    def from_hf_decoder(cls, directory: str | Path, variant: str = "concat", size: str | None = None,
                        **overrides) -> "DecoderHintModel":
        """A Hugging Face decoder-only directory as the base (see HintModel.from_hf_checkpoint).
        Its shape comes from config.json; `size` only supplies the PEFT sizes (by default the
        decoder-only preset of the same d_model, else llama-tiny). The variant is checked (the
        model built) before any weight is read."""
        directory = Path(directory)
        hf = checkpoint.read_json(directory)
        family = HF_MODEL_TYPES.get(hf.get("model_type"))
        if family is None:
            raise checkpoint.CheckpointError(
                f"{directory / checkpoint.CONFIG}: model_type {hf.get('model_type')!r} is not "
                f"supported; supported: t5, {', '.join(HF_MODEL_TYPES)}")
        try:
            fields = family.config_fields(hf, directory / checkpoint.CONFIG)
        except KeyError as e:
            raise checkpoint.CheckpointError(
                f"{directory / checkpoint.CONFIG}: missing key {e.args[0]!r}") from None
        fields.update(pad_token_id=_token_id(hf, "pad_token_id", hf.get("eos_token_id")),
                      eos_token_id=_token_id(hf, "eos_token_id", 0))
        size = size or next((name for name, s in SIZE_PRESETS.items()
                             if "model_type" in s and s["d_model"] == fields["d_model"]),
                            "llama-tiny")
        # the size preset's shape fields back to their defaults: the checkpoint's shape replaces it
        reset = {k: HintConfig.__dataclass_fields__[k].default for k in SIZE_PRESETS.get(size, {})
                 if k not in ("adapter_size", "prefix_length", "lora_rank")}
        model = cls(HintConfig.preset(size, variant=variant, **{**reset, **fields, **overrides}))
        checkpoint.load_mapped(model.base, family.key_map(model.config),
                               checkpoint.read_hf_tensors(directory), directory,
                               tied_head=model.config.tie_word_embeddings)
        return model


def _token_id(hf: dict, name: str, default) -> int:
    """A token id of config.json; a list (several EOS tokens) gives its first."""
    value = hf.get(name)
    value = default if value is None else value
    value = value[0] if isinstance(value, list) else value
    return 0 if value is None else int(value)
