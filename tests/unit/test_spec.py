"""Spec validation, expansion, run ids, and the CLI's handling of bad input."""

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb.errors import SpecError
from spectraldb.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def write(tmp_path, text, name="experiments.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


BAD = [
    ("""\
     train: {steps: 200}
     sweep:
       optimizer:
         - {name: adamw}
         - {name: muon}
         - {name: adamx}
     """, "experiments.yaml:6 sweep.optimizer[2]: unknown optimizer 'adamx' (expected one of: adamw, muon, normuon, dion)"),
    ("model:\n  d_model: 64\n  colour: red\n", "experiments.yaml:3 model.colour: unknown key 'colour'"),
    ("train:\n  steps: ten\n", "experiments.yaml:2 train.steps: Input should be a valid integer, got 'ten'"),
    ("train:\n  steps: 2.5\n", "experiments.yaml:2 train.steps: Input should be a valid integer, got 2.5"),
    ("model: {ffn_mult: 0}\n", "experiments.yaml:1 model.ffn_mult: Input should be greater than 0, got 0"),
    ("measure:\n  sites: [pre, middle]\n",
     "experiments.yaml:2 measure.sites[1]: 'middle' is not allowed (expected 'pre' or 'post')"),
    ("train: {steps: 10}\nmeasure:\n  every: 20\n", "experiments.yaml:3 measure.every: 20 exceeds train.steps (10)"),
    ("model: {d_model: 64}\nsweep:\n  model.n_head: [4, 3]\n",
     "experiments.yaml:3 sweep.model.n_head[1]: d_model 64 is not divisible by n_head 3"),
    ("sweep:\n  model.width: [1, 2]\n", "experiments.yaml:2 sweep.model.width: unknown field 'width'"),
    ("sweep:\n  ffn_mult: []\n", "experiments.yaml:2 sweep.ffn_mult: an axis needs a non-empty list of values"),
    ("sweep:\n  ffn_mult: [1, 1]\n", "experiments.yaml:2 sweep: runs 1 and 2 are identical"),
    ("sweep:\n  zip:\n    - {train.steps: [600, 1200], measure.every: [100]}\n",
     "experiments.yaml:3 sweep.zip[0]: zipped lists differ in length (2, 1)"),
    ("train: {steps: 10\n", "experiments.yaml:2 malformed YAML"),
    ("train:\n  steps: 10\n  seed: 1\n  steps: 20\n", "experiments.yaml:4 train.steps: duplicate key"),
    ("- just\n- a list\n", "experiments.yaml:1 spec: expected a mapping at the top level"),
]


@pytest.mark.parametrize("text, message", BAD)
def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    spec = write(tmp_path, text)
    for cmd in (["run", str(spec)], ["plan", str(spec)]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 2, result.output
        err = result.stderr.strip()
        assert err.startswith(message), err
        assert "\n" not in err and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [spec]  # no store, nothing else written


def test_run_id_is_stable_under_key_reordering_and_defaults(tmp_path):
    a = write(tmp_path, """\
        model: {d_model: 32, n_head: 2}
        train: {steps: 50, seed: 3}
        measure: {every: 10}
        """, "a.yaml")
    b = write(tmp_path, """\
        measure: {every: 10, source: heldout}
        train: {seed: 3, steps: 50, device: cpu}
        model: {n_head: 2, d_model: 32, ffn_mult: 4}
        name: other
        """, "b.yaml")
    ra, rb = load_spec(a)[0].runs[0], load_spec(b)[0].runs[0]
    assert ra.run_id == rb.run_id
    c = write(tmp_path, "model: {d_model: 32, n_head: 2}\ntrain: {steps: 50, seed: 4}\nmeasure: {every: 10}\n", "c.yaml")
    assert load_spec(c)[0].runs[0].run_id != ra.run_id


def test_sweep_product_zip_and_aliases(tmp_path):
    spec = write(tmp_path, """\
        train: {steps: 600}
        optimizer: {name: muon, lr: 3e-3}
        sweep:
          optimizer: [adamw, {name: muon, ns: keller}]
          ffn_mult: [1, 2, 4]
          zip:
            - {seed: [0, 1], train.steps: [600, 1200]}
        """)
    plan, _ = load_spec(spec)
    assert len(plan.runs) == 2 * 3 * 2
    assert {(r.train.seed, r.train.steps) for r in plan.runs} == {(0, 600), (1, 1200)}
    assert {r.label for r in plan.runs} == {"AdamW", "Muon"}
    assert {r.model.ffn_width for r in plan.runs} == {64, 128, 256}
    muon = [r for r in plan.runs if r.label == "Muon"][0]
    assert muon.optimizer.ns == "keller" and muon.optimizer.lr == 0.02  # a sweep value replaces the whole optimizer
    assert len({r.run_id for r in plan.runs}) == 12


def test_override_is_validated_like_the_file(tmp_path):
    spec = write(tmp_path, "train: {steps: 200}\nsweep:\n  ffn_mult: [1, 2]\n")
    plan, _ = load_spec(spec, ["train.steps=300", "sweep.ffn_mult=[1, 2, 8]", "optimizer=muon"])
    assert [r.model.ffn_mult for r in plan.runs] == [1, 2, 8]
    assert plan.runs[0].train.steps == 300 and plan.runs[0].label == "Muon"
    with pytest.raises(SpecError, match=r"^-S train.steps=abc train.steps: Input should be a valid integer"):
        load_spec(spec, ["train.steps=abc"])
    with pytest.raises(SpecError, match="unknown field 'nope'"):
        load_spec(spec, ["train.nope=1"])
    result = runner.invoke(app, ["plan", str(spec), "-S", "model.ffn_mult=-2"])
    assert result.exit_code == 2 and "model.ffn_mult" in result.stderr


def test_missing_spec_file(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "no such spec file" in result.stderr


def test_version_names_the_stack():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    for name in ("specdb", "torch", "duckdb", "ray"):
        assert name in result.output


def test_sweep_blocks_are_united_and_a_run_two_blocks_declare_is_one_run(tmp_path):
    """`sweep:` as a list: block 0 is AdamW and Muon × 1, 2; block 1 re-declares AdamW × 2 and adds
    n_head 8 for AdamW × 1, 2 — 6 runs, not 7."""
    path = write(tmp_path, """
        sweep:
          - optimizer: [adamw, muon]
            ffn_mult: [1, 2]
          - model.n_head: [4, 8]
            ffn_mult: [2]
          - model.n_head: [8]
            ffn_mult: [1]
        """)
    runs = load_spec(path)[0].runs
    assert sorted((r.label, r.model.ffn_mult, r.model.n_head) for r in runs) == [
        ("AdamW", 1, 4), ("AdamW", 1, 8), ("AdamW", 2, 4), ("AdamW", 2, 8), ("Muon", 1, 4), ("Muon", 2, 4)]


@pytest.mark.parametrize("sweep, where", [
    ("sweep: []", "sweep: an empty list"),
    ("sweep:\n  - ffn_mult: [1]\n  - ffn_mult: [0]", "sweep[1].ffn_mult[0]"),
    ("sweep:\n  - ffn_mult: [1]\n  - 3", "sweep[1]: expected a mapping"),
    ("sweep:\n  - {}\n", "sweep[0]: no axes"),
    ("sweep:\n  - zip: [{seed: [1, 2], ffn_mult: [1]}]", "sweep[0].zip[0]: zipped lists differ"),
])
def test_bad_sweep_blocks_name_their_block(tmp_path, sweep, where):
    path = write(tmp_path, sweep + "\n")
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 2 and where in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    override = runner.invoke(app, ["plan", str(write(tmp_path, "sweep:\n  - ffn_mult: [1, 2]\n", "b.yaml")),
                                   "-S", "sweep.seed=[1, 2]"])
    assert override.exit_code == 2 and "list of blocks" in override.stderr


def test_run_ids_issued_before_measure_memory_and_metrics_are_unchanged():
    """Ids computed by specdb at 960cc1e (before measure.memory): a store keeps knowing its runs,
    whatever the budget (memory is never hashed) and with the full metric suite (the default)."""
    from spectraldb.spec.checkpoints import CheckpointsSpec
    from spectraldb.spec.models import RunSpec
    from spectraldb.spec.tracked import TrackedSpec

    tracked = TrackedSpec(source="tracked", optimizer="AdamW", model={"d_model": 64, "n_layer": 2, "ffn_width": 256},
                          steps=100, seed=0)
    checkpoint = CheckpointsSpec.model_validate({"checkpoints": [{"path": "x", "optimizer": "AdamW", "step": 5}]}).runs()[0]
    assert (tracked.run_id, checkpoint.run_id, RunSpec().run_id) == ("80260243e27de958", "ca66884d74b6791e",
                                                                     "e85012adae5beb7f")
    budget = {"measure": {"memory": "300MiB"}}
    assert RunSpec.model_validate(budget).run_id == RunSpec().run_id
    assert tracked.model_copy(update={"measure": tracked.measure.model_copy(update={"memory": 5})}).run_id == tracked.run_id
