"""Generator design (paper Sec. 5, Table 6): the single cross-attention layer over learned
slot embeddings ("component") against a T5 decoder stack in its place (HyperTune-style), at
two depths; and the component generator's own shape around the paper's (at 3B, d_model 2048:
MLP width 2048, 32 heads of 64), its MLP width halved and doubled, its heads halved and doubled.
One factor at a time in one grid: crossing heads with the decoder generator would be
meaningless (it has the T5's heads), and crossing everything would be 27 trials at 3B."""

from ray import tune

from tune_spaces.study import Study

_COMPONENT = {"generator": "component"}

STUDY = Study(
    name="generator",
    question="Does a single cross-attention generator beat a full decoder generator?",
    space={
        "model.overrides": tune.grid_search(
            [_COMPONENT]
            + [{**_COMPONENT, "generator_mlp_dim": width} for width in (1024, 4096)]
            + [{**_COMPONENT, "generator_heads": heads} for heads in (16, 64)]
            + [{"generator": "decoder", "generator_layers": layers} for layers in (1, 2)]
        ),
    },
)
