"""PEFT size: adapter bottleneck and prefix length, each varied from the paper's setting
(adapter 512, prefix 30 at 3B) with the other kept, and generated LoRA of a few ranks. One
factor at a time, so the report's "metric vs PEFT size" plot reads as a curve per factor."""

from ray import tune

from tune_spaces.study import Study

_LORA = {"adapters": False, "prefixes": False, "lora": True}

STUDY = Study(
    name="peft_size",
    question="How does performance scale with the size of the generated PEFT modules?",
    space={
        "model.overrides": tune.grid_search(
            [{"adapter_size": a} for a in (64, 128, 256, 512)]
            + [{"prefix_length": p} for p in (7, 15, 60)]
            + [{**_LORA, "lora_rank": r} for r in (8, 32, 128)]
        ),
    },
)
