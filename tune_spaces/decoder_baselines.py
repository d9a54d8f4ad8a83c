"""Appendix D: the decoder-only baselines of Table 1 (GPT-2 XL, OPT-13B, fully fine-tuned on SNI
with the Tk-Instruct string): 3, 5 and 10 epochs x three learning rates, batch 32, AdamW with
1,000 warmup steps and linear decay to 0 (the base configs, paper/gpt2-xl-* and
paper/opt-13b-*). The table's cell is the best run by held-out ROUGE-L, as the paper reports
"the highest overall results": every trial trains to the end and is evaluated (fifo, no early
stopping on the loss).

Learning rates. The paper's values were lost from its text. The one decoder-only training script
of the authors we found fine-tunes OPT-13B on SNI Def + 2 Pos. with transformers' trainer at
`learning_rate=1e-5`, `warmup_steps=1000`, 3 epochs, max_source_length 768 and
max_target_length 128 (a file beside the reference's ni_tasks/ni_collator.py, found in the code
index by its text `OPTForCausalLM.from_pretrained('facebook/opt-13b')`; it is not in the tree of
allenai/hyper-task-descriptions we could read, so its path is unknown). We sweep that rate and
half a decade either side: 5e-6 (a 13B model fully fine-tuned often wants less) and 5e-5
(GPT-2 XL's 1.5B usually takes more).

Epochs as optimizer steps: SNI's default train split is 756 tasks of at most 100 instances
(`max_per_task: 100`), 75,600 examples, 2,362 steps of 32 per epoch (the last partial batch of
an epoch is dropped, training/driver.py). A split with other counts: edit EPOCH_STEPS.
"""

from ray import tune

from tune_spaces.study import Study

EPOCHS = (3, 5, 10)
LEARNING_RATES = (5e-6, 1e-5, 5e-5)
EPOCH_STEPS = 756 * 100 // 32

STUDY = Study(
    name="decoder_baselines",
    question="Which epochs and learning rate give a decoder-only baseline its best held-out ROUGE-L?",
    space={
        "train.max_steps": tune.grid_search([epochs * EPOCH_STEPS for epochs in EPOCHS]),
        "train.lr": tune.grid_search(list(LEARNING_RATES)),
    },
    metric="eval/rougeL",
    mode="max",
    base_config="paper/gpt2-xl-sni-def",
    base_overrides={},
    scheduler="fifo",
)
