"""Generated LoRA rank on a decoder-only base (issue 20), `lora_only` so that every trial exports
as a PEFT adapter vLLM serves: ranks 4, 8 (Text-to-LoRA's) and 16 per target. GPT-2's fused
c_attn holds q and v as one PEFT module of r = 2 x rank: 8, 16, 32, each in vLLM's allowed ranks
(hint_model/peft_export.py VLLM_RANKS); on a Llama-style base use 8, 16, 32 (r = rank).
Base: decoder/hint-gpt2-xl-sni-def."""

from ray import tune

from tune_spaces.study import Study

STUDY = Study(
    name="decoder_lora_rank",
    question="How does a generated LoRA adapter's rank trade quality for size on a decoder-only base?",
    space={
        "model.variant": "lora_only",
        "model.overrides.lora_rank": tune.grid_search([4, 8, 16]),
    },
    base_config="decoder/hint-gpt2-xl-sni-def",
)
