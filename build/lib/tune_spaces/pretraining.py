"""Hypernetwork pretraining (paper Sec. 5): fine-tuning from the LM-adapted T5 with a fresh
hypernetwork (no pretraining) against hypernetworks pretrained on C4 for a few lengths.

The pretrained starting points are exports of earlier `hint train` runs, e.g.
`hint train configs/paper/hint-3b-pretrain-c4.yaml name=hint-3b-pretrain-c4-2k
train.max_steps=2000`; point the grid at your own with `--config` or by editing this list.
"""

from ray import tune

from tune_spaces.study import Study

STUDY = Study(
    name="pretraining",
    question="How much does C4 pretraining of the hypernetwork help, and how long is enough?",
    space={
        "model.init_from": tune.grid_search([
            "checkpoints/t5-xl-lm-adapt",  # no hypernetwork pretraining
            "runs/hint-3b-pretrain-c4-2k/export",
            "runs/hint-3b-pretrain-c4/export",  # 10k steps, the paper's setting
        ]),
    },
)
