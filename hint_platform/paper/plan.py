"""The paper's experiments as data: tables -> rows -> cells, each cell one evaluated run, each
run the last stage of a chain (pretraining, then fine-tuning from its export).

A `Stage` is a shipped config (`paper/hint-{3b|11b}-{setup}`) plus what this run changes: the
model variant, fields set on every data source (the format of a baseline, the positive examples,
the P3 shots), other overrides, and the stage whose export it starts from (`start`; None: the
LM-adapted T5 checkpoint). Names are templates in `{size}` (3b / 11b); a stage named like its
config is the config as shipped (checked by tests/test_paper_plan.py, with every config of
configs/paper/ and every RayJob entrypoint of infra/kuberay/).

The decoder-only baselines of Table 1 (GPT-2 XL, OPT-13B, Appendix D) are of one size each:
their stages have configs of their own (`paper/<setup>`, starting from the Hugging Face
checkpoint the config names), and their chain is a Tune sweep (`study`): the cell is the best
trial by held-out ROUGE-L.

Variant names are hint_model's VARIANT_PRESETS, format names pipelines.spec's FORMATS: a preset
or format that lands later is a one-line change below. Rows follow the paper's tables; where the
paper is silent the reference repository (allenai/hyper-task-descriptions) decides, cited.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

SIZES = {"xl": "3b", "xxl": "11b"}  # size preset -> the tag in config and run names


@dataclass(frozen=True)
class Stage:
    name: str  # run name template, `{size}` -> 3b / 11b
    setup: str  # the shipped config paper/hint-{size}-{setup}
    start: "Stage | None" = None  # its export is model.init_from; None: the LM-adapted T5
    variant: str = "hint"
    sources: tuple[tuple[str, Any], ...] = ()  # fields set on every train and eval source
    overrides: tuple[str, ...] = ()  # any other `key=value`
    own_config: bool = False  # the config is paper/<setup>, the same at every size
    study: str = ""  # a tune_spaces study over the config: the cell is its best trial

    def run_name(self, size: str) -> str:
        return self.name.format(size=SIZES[size])

    def config_name(self, size: str) -> str:
        return f"paper/{self.setup}" if self.own_config else f"paper/hint-{SIZES[size]}-{self.setup}"

    def chain(self) -> list["Stage"]:
        """The stages this one needs, itself last."""
        return [*(self.start.chain() if self.start else []), self]


@dataclass(frozen=True)
class Row:
    label: str
    cells: tuple[tuple[str, Stage], ...]  # (column, the evaluated stage)


@dataclass(frozen=True)
class Table:
    key: str  # what `hint paper run|table` takes
    title: str
    kind: str  # "runs": evaluated stages; "lengths": Table 7; "flops": Appendix C
    metrics: tuple[str, ...] = ()  # eval metrics a cell shows, the first is the headline
    rows: tuple[Row, ...] = ()
    sizes: tuple[str, ...] = ("xl",)
    note: str = ""

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(c for row in self.rows for c, _ in row.cells))

    def stages(self) -> list[Stage]:
        """Every stage of the table in an order that runs each after its start, no repeats."""
        ordered: dict[str, Stage] = {}
        for row in self.rows:
            for _, stage in row.cells:
                for s in stage.chain():
                    ordered.setdefault(s.name, s)
        return list(ordered.values())

    def only(self, labels: list[str]) -> "Table":
        """The table restricted to the rows `labels` names (all of them when empty)."""
        unknown = [label for label in labels if label not in {r.label for r in self.rows}]
        if unknown:
            raise KeyError(f"{self.key} has no row {unknown[0]!r}; its rows: "
                           + ", ".join(r.label for r in self.rows))
        return replace(self, rows=tuple(r for r in self.rows if r.label in labels)) if labels else self

    def evaluated(self) -> list[Stage]:
        return list({s.name: s for row in self.rows for _, s in row.cells}.values())


def _concat(num_pos: int) -> tuple[tuple[str, Any], ...]:
    return (("format", "concat"), ("num_pos", num_pos))


# --- pretraining (Section 4, Table 4) ---
PRETRAIN = Stage("hint-{size}-pretrain-c4", "pretrain-c4")
PRETRAIN_CACLM = Stage("hint-{size}-pretrain-caclm", "pretrain-caclm")


def pretrained(variant: str, setup: str = "sni-def", caclm: bool = False) -> Stage:
    """`variant` fine-tuned on `setup` after its own C4 pretraining (the reference pretrains each
    ablation: scripts/pretraining/pretrain_only_*_no_fid.sh, pretrain_decoder.sh, ...)."""
    tag = variant.replace("_", "-")
    base = "pretrain-caclm" if caclm else "pretrain-c4"
    start = Stage(f"{tag}-{{size}}-{base}", base, variant=variant)
    return Stage(f"{tag}-{{size}}-{setup}" + ("-caclm" if caclm else ""), setup, start, variant)


def from_t5(name: str, setup: str, variant: str, sources=(), overrides=()) -> Stage:
    """A run fine-tuned straight from the LM-adapted T5 (the baselines; no pretraining)."""
    return Stage(name, setup, None, variant, tuple(sources), tuple(overrides))


def decoder_baseline(model: str, setup: str, num_pos: int) -> Stage:
    """A decoder-only model fully fine-tuned with the Tk-Instruct string (Appendix D), from the
    Hugging Face checkpoint its config names; the cell: the best of the decoder_baselines sweep."""
    return Stage(f"{model}-{setup}", f"{model}-{setup}", None, "concat", _concat(num_pos),
                 own_config=True, study="decoder_baselines")


# --- Table 1: SNI, Def and Def + 2 Pos. ---
# Kept on purpose (a stronger Hypter than the paper's): its hyper-encoder starts as the T5 encoder.
HYPTER_ENCODER = ("Hypter's instruction encoder starts here as the T5 encoder; the reference's "
                  "run restores no hypernetwork weight (gins/restore_pretrained.gin), which leaves "
                  "it random: our Hypter is the stronger baseline.")
HINT_DEF = Stage("hint-{size}-sni-def", "sni-def", PRETRAIN)
HINT_DEF_2POS = Stage("hint-{size}-sni-def-2pos", "sni-def-2pos", PRETRAIN)
# HyperTune pretrains on the 4-part CACLM split (scripts/pretraining/pretrain_htune.sh with
# gins/pretrain_4part.gin), not on ours.
HYPERTUNE_PRETRAIN = Stage("hypertune-{size}-pretrain-caclm", "pretrain-caclm", variant="hypertune")
TK_DEF = from_t5("tk-instruct-{size}-sni-def", "sni-def", "concat", _concat(0))
TK_DEF_2POS = from_t5("tk-instruct-{size}-sni-def-2pos", "sni-def-2pos", "concat", _concat(2))

TABLE1 = Table(
    "table1", "Table 1: Super-Natural Instructions, held-out tasks (ROUGE-L, GFLOPs per task)",
    "runs", ("rougeL", "exact_match", "gflops_per_task"), sizes=("xl", "xxl"), rows=(
        Row("Tk-Instruct", (("Def", TK_DEF), ("Def + 2 Pos.", TK_DEF_2POS))),
        Row("Tk-Instruct + PEFT", (
            ("Def", from_t5("tk-instruct-peft-{size}-sni-def", "sni-def", "static_peft", _concat(0))),
            ("Def + 2 Pos.", from_t5("tk-instruct-peft-{size}-sni-def-2pos", "sni-def-2pos", "static_peft", _concat(2))))),
        Row("No-Instruct", (
            ("Def", from_t5("no-instruct-{size}-sni", "sni-def", "no_instruct", (("format", "no_instruct"),))),)),
        # Hypter has no pretraining (Section 4, Baselines).
        Row("Hypter", (
            ("Def", from_t5("hypter-{size}-sni-def", "sni-def", "hypter")),
            ("Def + 2 Pos.", from_t5("hypter-{size}-sni-def-2pos", "sni-def-2pos", "hypter")))),
        Row("HyperTune", (
            ("Def", Stage("hypertune-{size}-sni-def", "sni-def", HYPERTUNE_PRETRAIN, "hypertune")),
            ("Def + 2 Pos.", Stage("hypertune-{size}-sni-def-2pos", "sni-def-2pos", HYPERTUNE_PRETRAIN, "hypertune")))),
        Row("HINT", (("Def", HINT_DEF), ("Def + 2 Pos.", HINT_DEF_2POS))),
        Row("GPT-2 XL", (("Def", decoder_baseline("gpt2-xl", "sni-def", 0)),
                         ("Def + 2 Pos.", decoder_baseline("gpt2-xl", "sni-def-2pos", 2)))),
        Row("OPT-13B", (("Def", decoder_baseline("opt-13b", "sni-def", 0)),
                        ("Def + 2 Pos.", decoder_baseline("opt-13b", "sni-def-2pos", 2)))),
    ),
    note="Tk-Instruct / + PEFT / No-Instruct / Hypter start from the LM-adapted T5; HyperTune "
         "and HINT from their own C4 pretraining; GPT-2 XL and OPT-13B (the same at both sizes) "
         "from their Hugging Face checkpoints, each cell the best of its decoder_baselines sweep "
         "(GFLOPs per task: with the instruction's key/values computed once per task). "
         + HYPTER_ENCODER)

# --- Table 2: P3 (T0's held-out datasets, rank classification) ---
HINT_P3_JOINT = Stage("hint-{size}-p3-joint", "p3-joint", PRETRAIN)
HINT_P3_SPLIT = Stage("hint-{size}-p3-split", "p3-split", PRETRAIN)
T0 = from_t5("t0-{size}-p3", "p3-joint", "concat", (("format", "concat"),))
TABLE2 = Table(
    "table2", "Table 2: P3, T0 held-out datasets (accuracy, GFLOPs per task)",
    "runs", ("accuracy", "gflops_per_task"), sizes=("xl", "xxl"), rows=(
        Row("T0", (("accuracy", T0),)),
        Row("T0 + PEFT", (("accuracy", from_t5("t0-peft-{size}-p3", "p3-joint", "static_peft", (("format", "concat"),))),)),
        # 'No Prompt': the instance fields only, no template anywhere (the split rendering).
        Row("No Prompt", (("accuracy", from_t5("no-prompt-{size}-p3", "p3-split", "no_instruct")),)),
        # Adapters of 4 on P3 (scripts/t0_train_hypter.sh overrides hypter.gin's 8; the only
        # P3 Hypter script, at xl: 11B takes the same).
        Row("Hypter", (("accuracy", from_t5("hypter-{size}-p3", "p3-split", "hypter",
                                            overrides=("model.overrides.adapter_size=4",))),)),
        Row("HINT (split)", (("accuracy", HINT_P3_SPLIT),)),
        Row("HINT (joint)", (("accuracy", HINT_P3_JOINT),)),
    ),
    note="Scored as T0 scores them: the original-task templates with answer choices, by rank "
         "classification. " + HYPTER_ENCODER)

# --- Table 3: P3 few-shot. The reference's t0_xshot scripts: shots 1, 2, 4, 5, trained from the
# LM-adapted T5 (scripts/t0_few_shot/t0_xshot_train_*.sh); HINT reads the shots, T0 gets them in
# its input (seqio_tasks/few_shot.py). Evaluation shots come from each dataset's train records.
SHOTS = (1, 2, 4, 5)


def _shots(k: int) -> tuple[tuple[str, Any], ...]:
    return (("num_shots", k), ("shots_path", "{dir}/train.jsonl"))


TABLE3 = Table(
    "table3", "Table 3: P3 few-shot (accuracy, GFLOPs per task)", "runs",
    ("accuracy", "gflops_per_task"), rows=(
        Row("T0", tuple((f"{k}-shot", from_t5(f"t0-{{size}}-p3-{k}shot", "p3-joint", "concat",
                                              (("format", "concat"), *_shots(k)))) for k in SHOTS)),
        Row("HINT", tuple((f"{k}-shot", from_t5(f"hint-{{size}}-p3-{k}shot", "p3-split", "hint", _shots(k)))
                          for k in SHOTS)),
    ))

# --- Table 4: pretraining, none / ours (C4) / CACLM, with and without fusion, on SNI Def ---
NO_FUSION_DEF = pretrained("hint_no_fusion")
TABLE4 = Table(
    "table4", "Table 4: hypernetwork pretraining (SNI Def, ROUGE-L)", "runs",
    ("rougeL", "exact_match"), rows=(
        Row("HINT", (("None", from_t5("hint-{size}-sni-def-no-pretraining", "sni-def", "hint")),
                     ("Ours", HINT_DEF),
                     ("CACLM", Stage("hint-{size}-sni-def-caclm", "sni-def", PRETRAIN_CACLM)))),
        Row("HINT - No Instr. Fus.", (
            ("None", from_t5("hint-no-fusion-{size}-sni-def-no-pretraining", "sni-def", "hint_no_fusion")),
            ("Ours", NO_FUSION_DEF),
            ("CACLM", pretrained("hint_no_fusion", caclm=True)))),
    ))

# --- Section 6.3: ablations on SNI Def, each variant after its own pretraining ---
PEFT = Table(
    "peft", "Section 6.3: PEFT type, no instruction fusion (SNI Def, ROUGE-L)", "runs",
    ("rougeL", "exact_match", "gflops_per_task"), rows=(
        Row("Adapters + Prefixes", (("Def", NO_FUSION_DEF),)),
        Row("Adapters only", (("Def", pretrained("adapters_only")),)),
        Row("Prefixes only", (("Def", pretrained("prefixes_only")),)),
        Row("LoRA only", (("Def", pretrained("lora_only")),)),
        Row("LoRA only (rank 128)", (("Def", pretrained("lora_only_smaller")),)),
    ))
FUSION = Table(
    "table6", "Table 6: PEFT generation and instruction fusion (SNI Def, ROUGE-L)", "runs",
    ("rougeL", "exact_match", "gflops_per_task"), rows=(
        Row("HINT", (("Def", HINT_DEF),)),
        Row("- Instr. Fus.", (("Def", NO_FUSION_DEF),)),
        Row("- PEFT Gen.", (("Def", pretrained("hint_no_peft")),)),
    ))
GENERATOR = Table(
    "generator", "Section 6.3: parameter generator (SNI Def, ROUGE-L)", "runs",
    ("rougeL", "exact_match", "gflops_per_task"), rows=(
        Row("Cross-attention layer", (("Def", HINT_DEF),)),
        Row("Full decoder", (("Def", pretrained("generator_decoder")),)),
    ),
    # Kept on purpose: the row changes the generator alone (HINT's adapters, prefixes and fusion
    # stay), so that its gap to the cross-attention row is the generator's; the reference's run
    # (pretrain_our_decoder.sh, hypertune_embed.gin) also drops the adapters and writes each kind
    # for every layer from one MLP (per_layer_hnet): three changes in one cell.
    note="Full decoder: HINT with a T5-decoder generator, everything else as HINT; the reference's "
         "run was also prefixes-only with a per-layer hypernetwork (gins/hypertune_embed.gin).")

# --- Table 7: median token lengths of each format's training data (pipelines.prepare) ---
LENGTHS = Table(
    "table7", "Table 7: median lengths in tokens (training data)", "lengths",
    ("instruction", "input", "output"), sizes=("xl",), rows=(
        Row("SNI Def (HINT)", (("", HINT_DEF),)),
        Row("SNI Def + 2 Pos. (HINT)", (("", HINT_DEF_2POS),)),
        Row("SNI Def (Tk-Instruct)", (("", TK_DEF),)),
        Row("SNI Def + 2 Pos. (Tk-Instruct)", (("", TK_DEF_2POS),)),
        Row("P3 (HINT, split)", (("", HINT_P3_SPLIT),)),
        Row("P3 (HINT, joint)", (("", HINT_P3_JOINT),)),
        Row("P3 (T0)", (("", T0),)),
    ),
    note="The paper: medians over SNI's train split and 10,000 samples of P3's; here over the "
         "whole training data of each config.")

# --- Appendix C: FLOPs per task and task-state memory (hint_model.flops) at Table 7's medians ---
FLOPS = Table(
    "flops", "Appendix C: inference GFLOPs per task of 100 inputs, task-state memory", "flops",
    ("hint_gflops", "concat_gflops", "speedup", "hint_state_mib", "kv_cache_mib"),
    sizes=("xl", "xxl"), rows=(
        Row("SNI Def", (("", HINT_DEF), ("concat", TK_DEF))),
        Row("SNI Def + 2 Pos.", (("", HINT_DEF_2POS), ("concat", TK_DEF_2POS))),
        Row("P3", (("", HINT_P3_SPLIT), ("concat", T0))),
    ),
    note="Lengths: Table 7's medians (run `hint paper run table7` first); 100 inputs a task.")

TABLES = {t.key: t for t in (TABLE1, TABLE2, TABLE3, TABLE4, PEFT, FUSION, GENERATOR, LENGTHS, FLOPS)}


def table(key: str) -> Table:
    if key not in TABLES:
        raise KeyError(f"no table {key!r}; the paper's: {', '.join(TABLES)}")
    return TABLES[key]


def all_stages() -> list[Stage]:
    """Every stage of every table, each once."""
    return list({s.name: s for t in TABLES.values() for s in t.stages()}.values())


def source_fields(stage: Stage, source: dict[str, Any]) -> dict[str, Any]:
    """`source` with the stage's fields set; a string value may name `{dir}`, the directory
    of the source's own path (few-shot: the dataset's train records beside its eval file)."""
    directory = str(source.get("path", "")).rsplit("/", 1)[0]
    return {**source, **{k: v.format(dir=directory) if isinstance(v, str) else v
                         for k, v in stage.sources}}

