"""Every shipped spec loads, validates and plans with the run count the study needs."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    "paper_160m_width_sweep.yaml": (40, {"AdamW", "Muon", "NorMuon", "Dion (1/2)", "Dion (1/16)"}),
    "paper_350m_width_sweep.yaml": (16, {"AdamW", "Muon", "NorMuon", "Dion (1/16)"}),
    "paper_160m_dion_rank_sweep.yaml": (40, {"AdamW", "Dion (1/2)", "Dion (1/4)", "Dion (1/8)", "Dion (1/16)"}),
    "paper_160m_matched_loss.yaml": (24, {"AdamW", "Dion (1/16)"}),
    "paper_160m_architecture_vs_optimizer.yaml": (80, {"AdamW", "Muon", "NorMuon", "Dion (1/2)", "Dion (1/16)"}),
    "paper_160m_postln.yaml": (96, {"AdamW (lr=0.0001)", "AdamW (lr=0.0003)", "Muon", "NorMuon", "Dion (1/2)",
                                    "Dion (1/16)"}),
    "paper_160m_nope.yaml": (80, {"AdamW", "Muon", "NorMuon", "Dion (1/2)", "Dion (1/16)"}),
    "cpu_reproduction.yaml": (56, {"AdamW", "Muon", "NorMuon", "Dion (1/2)", "Dion (1/4)", "Dion (1/16)"}),
    "cpu_full_study.yaml": (92, {"AdamW", "AdamW (lr 1e-2)", "Muon", "NorMuon", "Dion (1/2)", "Dion (1/4)",
                                 "Dion (1/16)"}),
}
PAPER = sorted(name for name in EXAMPLES if name.startswith("paper_"))


CHECKPOINT_SPECS = {"checkpoints.yaml": 3}


def test_every_shipped_yaml_is_covered():
    assert {p.name for p in (ROOT / "examples").glob("*.yaml")} == set(EXAMPLES) | set(CHECKPOINT_SPECS)


@pytest.mark.parametrize("name", sorted(CHECKPOINT_SPECS))
def test_a_checkpoints_spec_loads(name):
    from spectraldb.spec.checkpoints import is_checkpoints_spec, load_checkpoints

    assert is_checkpoints_spec(ROOT / "examples" / name)
    spec, runs = load_checkpoints(ROOT / "examples" / name)
    assert len(runs) == CHECKPOINT_SPECS[name] == len({r.run_id for r in runs})
    assert all(r.source == "checkpoint" for r in runs)
    import jsonschema
    import yaml

    result = CliRunner().invoke(app, ["schema", "--kind", "checkpoints"])
    schema = __import__("json").loads(result.stdout)
    jsonschema.validate(yaml.safe_load((ROOT / "examples" / name).read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"checkpoints": [{"path": "x", "optimizer": "AdamW", "colour": 1}]}, schema)
    assert CliRunner().invoke(app, ["schema", "--kind", "nope"]).exit_code == 2


@pytest.mark.slow
def test_the_measure_your_own_models_examples_run_as_written(tmp_path):
    """README, "Measure your own models": the commands as a user types them, from a fresh folder."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def sh(*cmd):
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return out

    sh(sys.executable, str(ROOT / "examples" / "own_loop.py"), "own.duckdb")
    sh(sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "hf.duckdb")
    sh(sys.executable, "-m", "cli.main", "measure", str(ROOT / "examples" / "checkpoints.yaml"))
    for store, by in (("own.duckdb", "optimizer,data"), ("hf.duckdb", "optimizer,framework"),
                      ("checkpoints.duckdb", "optimizer,framework")):
        rows = json.loads(sh(sys.executable, "-m", "cli.main", "query", "beta", "--db", store, "--by", by,
                             "--format", "json").stdout)
        assert len(rows) == 1 and rows[0]["n_widths"] == 3 and rows[0]["beta_hard"] is not None, (store, rows)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A small token-shard folder standing in for the paper specs' FineWeb shards."""
    import numpy as np

    from workers.data import write_shard

    folder = tmp_path_factory.mktemp("fineweb")
    write_shard(folder / "fineweb_train_000001.bin", np.random.default_rng(0).integers(0, 50257, 200_000))
    return folder


TOKENISING = ("cpu_reproduction.yaml", "cpu_full_study.yaml")  # their plans tokenise the corpus: the slow tier


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in TOKENISING else n
                                  for n in sorted(EXAMPLES)])
def test_example_validates_and_plans(name, tmp_path, shards):
    """The paper specs plan for a GPU cluster (`--address`: this machine's memory and GPUs are not
    what will run them) on their token shards, made small here."""
    count, labels = EXAMPLES[name]
    plan, _ = load_spec(ROOT / "examples" / name)
    assert len(plan.runs) == count
    assert {r.label for r in plan.runs} == labels
    extra = ["--address", "ray://head:10001", "-S", f"data.corpus={shards}"] if name in PAPER else []
    result = CliRunner().invoke(app, ["plan", str(ROOT / "examples" / name), "--db", str(tmp_path / "p.duckdb"), *extra])
    assert result.exit_code == 0 and f"{count} runs: {count} new" in result.stderr, result.output


def test_a_paper_spec_planned_here_gets_runs_refusal(tmp_path, shards):
    """`plan` tells the truth: on this machine a 160M run does not fit, and `run` says so too."""
    name = str(ROOT / "examples" / "paper_160m_width_sweep.yaml")
    args = ["--db", str(tmp_path / "p.duckdb"), "-S", f"data.corpus={shards}"]
    planned = CliRunner().invoke(app, ["plan", name, *args])
    ran = CliRunner().invoke(app, ["run", name, *args])
    assert planned.exit_code == ran.exit_code == 2 and planned.stderr == ran.stderr
    assert "needs an estimated" in planned.stderr and not (tmp_path / "p.duckdb").exists()


@pytest.mark.parametrize("name", PAPER)
def test_paper_specs_follow_the_studys_protocol(name):
    """Dion with bf16 state, and the training batch measured as the study did: the strata on rank
    0's share (131,072 tokens on 4 ranks at 160M, 65,536 on 8 at 350M), `all` on every rank's."""
    for r in load_spec(ROOT / "examples" / name)[0].runs:
        share = 524288 // r.resources.workers
        assert r.resources.workers == (8 if "350m" in name else 4)
        assert r.measure.source == "train_batch" and r.measure.tokens == share and r.measure.last_k == 5
        assert r.measure.pooled_tokens == r.train.batch_size * r.data.context == 524288  # every rank's share
        assert r.measure.reduction == "study" and r.measure.min_stratum_tokens == 1000
        if r.optimizer.name == "dion":
            assert r.optimizer.state_dtype == "bf16"


def test_paper_shapes():
    runs = load_spec(ROOT / "examples" / "paper_160m_width_sweep.yaml")[0].runs
    r = runs[0]
    assert (r.model.d_model, r.model.n_layer, r.model.n_head, r.data.context) == (768, 12, 12, 512)
    assert (r.train.steps, r.train.batch_size, r.measure.every, r.measure.source) == (6000, 1024, 200, "train_batch")
    assert sorted({x.model.ffn_mult for x in runs}) == [1, 2, 3, 4, 5, 6, 7, 8]
    big = load_spec(ROOT / "examples" / "paper_350m_width_sweep.yaml")[0].runs[0]
    assert (big.model.d_model, big.model.n_layer, big.model.n_head, big.train.steps, big.measure.every) == \
        (1024, 24, 32, 8000, 400)


def ids(name, labels=None, steps=None):
    runs = load_spec(ROOT / "examples" / name)[0].runs
    return {r.run_id for r in runs if (labels is None or r.label in labels) and (steps is None or r.train.steps == steps)}


def test_rank_sweep_shares_run_ids_with_width_sweep():
    shared = ids("paper_160m_width_sweep.yaml") & ids("paper_160m_dion_rank_sweep.yaml")
    assert shared == ids("paper_160m_dion_rank_sweep.yaml", {"AdamW", "Dion (1/2)", "Dion (1/16)"})
    assert len(shared) == 24


def test_matched_loss_shares_its_6000_step_runs():
    shared = ids("paper_160m_width_sweep.yaml") & ids("paper_160m_matched_loss.yaml")
    assert shared == ids("paper_160m_matched_loss.yaml", steps=6000) and len(shared) == 16
    assert len(ids("paper_160m_matched_loss.yaml", {"AdamW"}, steps=12000)) == 8


def test_architecture_specs_share_their_reference_half_with_the_width_sweep():
    width = ids("paper_160m_width_sweep.yaml")
    runs = load_spec(ROOT / "examples" / "paper_160m_architecture_vs_optimizer.yaml")[0].runs
    assert {r.run_id for r in runs if r.model.n_head == 12} == width
    assert not {r.run_id for r in runs if r.model.n_head == 6} & width
    nope = load_spec(ROOT / "examples" / "paper_160m_nope.yaml")[0].runs
    assert {r.run_id for r in nope if r.model.pos == "rope"} == width
    postln = load_spec(ROOT / "examples" / "paper_160m_postln.yaml")[0].runs
    assert {r.model.n_post_norm for r in postln} == {3, 6, 9, 12}


def test_the_cpu_reproduction_and_the_default_share_runs():
    """The default's 8 runs are the reproduction's seed-0 AdamW/Muon runs at 1000 steps: a store
    that ran the default needs only the rest."""
    default = {r.run_id for r in load_spec(ROOT / "experiments.yaml")[0].runs}
    repro = load_spec(ROOT / "examples" / "cpu_reproduction.yaml")[0].runs
    assert len(default) == 8 and default <= {r.run_id for r in repro}
    long = [r for r in repro if r.train.steps == 2000]
    assert len(long) == 8 and {r.label for r in long} == {"AdamW"} and {r.measure.every for r in long} == {400}


@pytest.mark.parametrize("name, runs", [("timing.yaml", 8), ("counts.yaml", 24), ("dion.yaml", 8)])
def test_the_fidelity_specs_plan(name, runs):
    """docs/fidelity.md measures every remaining difference with these specs."""
    plan = load_spec(ROOT / "examples" / "fidelity" / name)[0]
    assert len(plan.runs) == runs and len({r.run_id for r in plan.runs}) == runs
    if name == "counts.yaml":
        assert sorted({(r.measure.tokens, r.measure.pooled_tokens) for r in plan.runs}) == \
            [(512, 4096), (1024, 1024), (1024, 4096)]


def test_the_full_study_holds_the_default_and_the_reproduction_and_each_finding():
    """Every run of experiments.yaml and cpu_reproduction.yaml is a run of cpu_full_study.yaml
    (shared run ids: a store that holds them is not trained again); its other 36 runs are the
    architecture, NoPE, post-LN and 4×-steps blocks."""
    full = {r.run_id: r for r in load_spec(ROOT / "examples" / "cpu_full_study.yaml")[0].runs}
    default = {r.run_id for r in load_spec(ROOT / "experiments.yaml")[0].runs}
    repro = {r.run_id for r in load_spec(ROOT / "examples" / "cpu_reproduction.yaml")[0].runs}
    assert default <= repro <= set(full) and len(full) - len(repro) == 36
    extra = [full[i] for i in set(full) - repro]
    count = lambda pred: sum(1 for r in extra if pred(r))  # noqa: E731
    assert count(lambda r: r.model.n_head == 2) == 8 and count(lambda r: r.model.pos == "nope") == 8
    assert count(lambda r: r.model.norm == "post") == 16 and count(lambda r: r.train.steps == 4000) == 4
