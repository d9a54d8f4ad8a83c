"""Complementarity of instruction fusion and generated PEFT (paper Table 6): the 2 x 2 grid of
fusion on/off x generated PEFT on/off. Both off is the No-Instruct baseline."""

from ray import tune

from tune_spaces.study import Study

STUDY = Study(
    name="fusion",
    question="Are instruction fusion and generated PEFT complementary?",
    space={
        "model.variant": tune.grid_search([
            "hint",  # fusion + PEFT
            "hint_no_fusion",  # PEFT only
            "hint_no_peft",  # fusion only
            "no_instruct",  # neither
        ]),
    },
)
