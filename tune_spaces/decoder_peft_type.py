"""PEFT type on a decoder-only base (issue 20): generated LoRA only (Text-to-LoRA's kind, the one
exportable as a PEFT / vLLM adapter), adapters + LoRA, and HINT's full set (adapters, prefixes
and LoRA, with instruction fusion). Base: decoder/hint-gpt2-xl-sni-def."""

from ray import tune

from tune_spaces.study import Study

STUDY = Study(
    name="decoder_peft_type",
    question="On a decoder-only base, what do generated adapters, prefixes and fusion add to LoRA?",
    space={
        "model.overrides": tune.grid_search([
            {"lora": True, "adapters": False, "prefixes": False, "fusion": False},  # lora_only
            {"lora": True, "adapters": True, "prefixes": False, "fusion": False},  # adapters + LoRA
            {"lora": True, "adapters": True, "prefixes": True, "fusion": True},  # hint
        ]),
    },
    base_config="decoder/hint-gpt2-xl-sni-def",
)
