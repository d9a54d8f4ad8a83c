"""Generator design (paper Sec. 5, Table 6): the single cross-attention layer over learned
slot embeddings ("component") against a T5 decoder stack in its place (HyperTune-style), at
two depths."""

from ray import tune

from tune_spaces.study import Study

STUDY = Study(
    name="generator",
    question="Does a single cross-attention generator beat a full decoder generator?",
    space={
        "model.overrides": tune.grid_search([
            {"generator": "component"},
            {"generator": "decoder", "generator_layers": 1},
            {"generator": "decoder", "generator_layers": 2},
        ]),
    },
)
