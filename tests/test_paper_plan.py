"""The paper's description (hint_platform/paper/plan.py) against what ships: every config of
configs/paper/ is a stage of it and says what the description says (size, variant, where it
starts from), every stage at every size resolves into a config whose model builds and whose
sources validate, and every RayJob entrypoint is the chain the description renders.

The configs are checked, not generated: they keep their comments (why each number), and the
branches that tune them edit YAML; a drift fails here, naming the file and the key."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from hint_model import VARIANT_PRESETS
from hint_platform import cli, config
from hint_platform.evaluation.workers import EvalWorkers
from hint_platform.paper import plan, runner
from hint_platform.paper.stages import chain_commands, resolve, split_overrides
from hint_platform.training.preflight import check
from hint_platform.tuning.plan import load_study_run
from pipelines.spec import SourceSpec, SpecError
from test_infra import INFRA, train_commands

PAPER_CONFIGS = [c for c in config.shipped_configs() if c.startswith("paper/")]
AT_SIZES = [(s, size) for t in plan.TABLES.values() for size in t.sizes for s in t.stages()]
AT_SIZES = list({(s.name, size): (s, size) for s, size in AT_SIZES}.values())
def test_every_paper_config_is_a_stage_of_the_description():
    used = {s.config_name(size) for s, size in AT_SIZES}
    assert set(PAPER_CONFIGS) <= used, sorted(set(PAPER_CONFIGS) - used)
    shipped_stages = [(s, size) for s, size in AT_SIZES if s.config_name(size) in PAPER_CONFIGS
                      and s.run_name(size) == config.load(s.config_name(size)).name]
    assert {s.config_name(size) for s, size in shipped_stages} == set(PAPER_CONFIGS)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_each_config_is_its_stage_as_shipped(name):
    """The stage named like the config needs no override: same size, variant, start (a
    decoder-only baseline: the same at every size, from its Hugging Face checkpoint)."""
    cfg = config.load(name)
    stage, size = [(s, size) for s, size in AT_SIZES
                   if s.config_name(size) == name and s.run_name(size) == cfg.name][0]
    assert cfg.model.variant == stage.variant
    if stage.own_config:
        assert config.model_config(cfg).is_decoder_only and cfg.model.preset == name.split("/")[1][:7]
        start = f"checkpoints/{cfg.model.preset}"
    else:
        assert cfg.model.preset == size
        start = (f"runs/{stage.start.run_name(size)}/export" if stage.start
                 else f"checkpoints/t5-{size}-lm-adapt")
    assert (cfg.model.init_from, cfg.data.tokenizer) == (start, start), name
    assert resolve(stage, size).overrides == []


@pytest.mark.parametrize("stage,size", AT_SIZES, ids=[f"{s.run_name(z)}" for s, z in AT_SIZES])
def test_every_stage_resolves_into_a_valid_run(stage, size):
    resolved = resolve(stage, size)
    cfg = resolved.cfg
    assert cfg.name == stage.run_name(size) and cfg.model.variant == stage.variant in VARIANT_PRESETS
    assert config.model_config(cfg).variant == stage.variant
    for i, source in enumerate(cfg.data.train + cfg.data.eval):
        spec = SourceSpec.from_dict(source, where=f"{stage.name} source {i}")
        for key, value in stage.sources:
            assert getattr(spec, key) == (value.format(dir=spec.path.rsplit("/", 1)[0])
                                          if isinstance(value, str) else value)
    expected = (resolve(stage.start, size).export_dir if stage.start
                else config.load(stage.config_name(size)).model.init_from if stage.own_config
                else f"checkpoints/t5-{size}-lm-adapt")
    assert cfg.model.init_from == expected
    if stage.start is None and stage.setup.startswith(("sni", "p3")):
        assert resolved.overrides[-2:] == [f"model.init_from={expected}", f"data.tokenizer={expected}"]
    # `hint train` reads the same run from the printed command
    assert config.load(resolved.config, resolved.overrides).to_dict() == cfg.to_dict()


def test_chains_run_every_start_before_its_stage():
    for t in plan.TABLES.values():
        seen = set()
        for stage in t.stages():
            assert stage.start is None or stage.start.name in seen, (t.key, stage.name)
            seen.add(stage.name)
        assert {s.name for s in t.evaluated()} <= seen


@pytest.mark.parametrize("job,size", [("hint-3b-job.yaml", "xl"), ("hint-11b-job.yaml", "xxl")])
def test_rayjob_entrypoints_are_the_description_rendered(job, size):
    """Each RayJob runs HINT's Table 1 'Def' chain with its paths on the shared volume."""
    (doc,) = [d for d in yaml.safe_load_all((INFRA / "kuberay" / job).read_text()) if d]
    expected = chain_commands(plan.HINT_DEF, size, shared_dir="/mnt/shared")
    assert train_commands(doc["spec"]["entrypoint"]) == expected, (
        "regenerate the entrypoint:\n" + " \\\n&& ".join(shlex.join(c) for c in expected))


def test_scoped_overrides_reach_only_their_setup():
    items = ["train.max_steps=2", "sni-def:data.tokenizer=a:b", "p3-joint:train.lr=0.1"]
    assert split_overrides(items, "sni-def") == ["train.max_steps=2", "data.tokenizer=a:b"]
    assert split_overrides(items, "sni-def-2pos") == ["train.max_steps=2"]
    stage = plan.TABLE1.rows[0].cells[0][1]  # Tk-Instruct Def: the format stays concat
    sources = [{"kind": "sni", "path": "/x", "format": "def", "split": "mini"}]
    cfg = resolve(stage, "xl", [f"sni-def:data.train={json.dumps(sources)}"]).cfg
    assert cfg.data.train == [{**sources[0], "format": "concat", "num_pos": 0}]


def test_paper_list_names_every_table_and_its_runs_at_both_sizes(capsys):
    assert cli.main(["paper", "list"]) == 0
    out = capsys.readouterr().out
    for key, t in plan.TABLES.items():
        assert f"{key}: {t.title}" in out
    for size in ("3b", "11b"):
        assert f"hint-{size}-pretrain-c4 " in out and f"tk-instruct-{size}-sni-def " in out
    assert "hypertune-3b-sni-def " in out and "from hypertune-3b-pretrain-caclm" in out
    for name in ("gpt2-xl-sni-def", "gpt2-xl-sni-def-2pos", "opt-13b-sni-def", "opt-13b-sni-def-2pos"):
        assert f"{name} " in out and f"paper/{name} concat, from its Hugging Face checkpoint" in out
    assert "[best of `hint tune decoder_baselines`]" in out and "not models of this platform" not in out


@pytest.mark.parametrize("name", [c for c in PAPER_CONFIGS if c.startswith(("paper/gpt2", "paper/opt"))])
def test_decoder_baseline_configs_pass_dry_run(name, capsys):
    """As shipped (the checkpoint not there yet: noted, not refused): the decoder-only model's
    parameters and memory, Appendix D's optimiser and schedule, lengths within its positions."""
    assert cli.main(["train", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.init_from: " in out and "lr_schedule: linear" in out
    cfg = config.load(name)
    assert (cfg.train.optimizer, cfg.train.warmup_steps, cfg.train.global_batch_size) == ("adamw", 1000, 32)
    model = config.model_config(cfg)
    d = cfg.data
    assert d.max_hyper_len + d.max_input_len + d.max_target_len <= model.max_position_embeddings
    with pytest.raises(config.ConfigError, match="longer than its"):
        check(cfg.with_overrides({"data.max_input_len": model.max_position_embeddings}))


def test_decoder_stages_are_sweeps_whose_study_validates():
    """The decoder-only cells are the best of `decoder_baselines` over their own config: every
    point of the sweep builds (3 epochs x 3 learning rates, Appendix D)."""
    stages = [s for s in plan.TABLE1.evaluated() if s.study]
    assert len(stages) == 4 and {s.study for s in stages} == {"decoder_baselines"}
    for stage in stages:
        run = load_study_run(stage.study, stage.config_name("xl"), check_data=False)
        assert run.expected_trials(1) == 9 and run.study.metric == "eval/rougeL" and run.study.mode == "max"


def test_hypertune_pretrains_on_the_4part_caclm_split():
    """scripts/pretraining/pretrain_htune.sh trains on gins/pretrain_4part.gin."""
    for size in ("xl", "xxl"):
        cfg = config.load(plan.HYPERTUNE_PRETRAIN.config_name(size))
        assert [s["format"] for s in cfg.data.train] == ["caclm"]


def test_unknown_tables_rows_and_sizes_are_user_errors(capsys):
    assert cli.main(["paper", "run", "table9"]) == 2
    assert "no table 'table9'" in capsys.readouterr().err
    assert cli.main(["paper", "run", "table1", "--row", "GPT-2"]) == 2
    assert "Tk-Instruct" in capsys.readouterr().err
    assert cli.main(["paper", "run", "table4", "--size", "xxl"]) == 2
    assert "at xl only" in capsys.readouterr().err
    with pytest.raises(SpecError):
        SourceSpec.from_dict({"kind": "sni", "path": "x", "format": "nope"})


def test_a_paper_run_on_a_cluster_is_one_checked_job(capsys):
    """`--address`: every stage must be on shared storage before anything is sent; the job runs
    the same `hint paper run` there, rows and all, and parses as this CLI's command."""
    assert cli.main(["paper", "run", "table1", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "only shared storage" in err and "run.storage_path='runs'" in err
    table = plan.TABLE2.only(["HINT (split)"])
    request = runner.paper_job(table, "xxl", ["train.max_steps=5"], shared_dir="/mnt/shared",
                               checkpoint=None, tracking_uri="http://mlflow:5000",
                               workers=EvalWorkers(count=4, gpus=0.5))
    argv = shlex.split(request.entrypoint)
    assert "--eval-workers=4" in argv and "--eval-gpus=0.5" in argv
    stages = dict(part.split(": ", 1) for part in request.metadata["hint_stage_gpus"].split("; "))
    assert stages["hint-11b-p3-split"].startswith("train 32") and stages["hint-11b-p3-split"].endswith("eval 2 (0.5 per worker)")
    assert argv[:6] == ["hint", "paper", "run", "table2", "--size", "xxl"]
    assert "--row=HINT (split)" in argv and "--shared-dir=/mnt/shared" in argv
    args, extra = cli.build_parser().parse_known_args(argv[1:])
    assert (args.table, args.size, args.row) == ("table2", "xxl", ["HINT (split)"])
    assert (args.eval_workers, args.eval_gpus) == (4, 0.5)
    assert args.overrides + extra == ["train.max_steps=5"]  # as cli.main joins them
    assert request.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # the address is checked only after the plan: an unreachable one is a clear error
    assert cli.main(["paper", "run", "table2", "--size", "xxl", "--row", "HINT (split)",
                     "--shared-dir", "/mnt/shared", "--address", "http://127.0.0.1:9"]) == 2
    assert "cannot reach a Ray cluster at http://127.0.0.1:9" in capsys.readouterr().err


def test_hypter_on_p3_has_adapters_of_4_and_on_sni_of_8():
    """scripts/t0_train_hypter.sh sets adapter_size=4 on gins/hypter.gin's 8 (ni_train_hypter.sh keeps 8)."""
    stages = {s.name: s for s in plan.all_stages()}
    p3 = config.model_config(resolve(stages["hypter-{size}-p3"], "xl").cfg)
    sni = config.model_config(resolve(stages["hypter-{size}-sni-def"], "xl").cfg)
    assert (p3.variant, p3.adapter_size, sni.adapter_size) == ("hypter", 4, 8)
