"""PEFT type (paper Table 6): generated adapters + prefixes (HINT), adapters only, prefixes
only, and LoRA only, all with instruction fusion."""

from ray import tune

from tune_spaces.study import Study

STUDY = Study(
    name="peft_type",
    question="Which generated PEFT modules matter: adapters, prefixes, or LoRA?",
    space={"model.variant": tune.grid_search(["hint", "adapters_only", "prefixes_only", "lora_only"])},
)
