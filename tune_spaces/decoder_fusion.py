"""Instruction fusion on a decoder-only base (issue 20): the instruction's own keys / values as
the prompt's prefix (computed once per task) on or off, with the generated modules of HINT
(LoRA, adapters, prefixes) either way. Base: decoder/hint-gpt2-xl-sni-def."""

from ray import tune

from tune_spaces.study import Study

STUDY = Study(
    name="decoder_fusion",
    question="Does a decoder-only HINT gain from reading the instruction's keys / values as well?",
    space={"model.variant": tune.grid_search(["hint", "hint_no_fusion"])},
    base_config="decoder/hint-gpt2-xl-sni-def",
)
