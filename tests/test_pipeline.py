"""End to end: a tiny sweep trains, measures and lands in a real DuckDB file (inline and Ray)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb.spec import load_spec
from tests.conftest import tiny_spec

pytestmark = pytest.mark.slow
runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def counts(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "evals", "spectra", "ranks")}
    finally:
        con.close()


def snapshot(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return (con.execute("SELECT run_id, step, val_loss FROM evals ORDER BY ALL").fetchall(),
                con.execute("SELECT run_id, step, layer, site, stratum, hard_rank FROM ranks ORDER BY ALL").fetchall())
    finally:
        con.close()


@pytest.fixture(scope="module")
def inline_store(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("inline")
    spec = tmp / "tiny.yaml"
    spec.write_text(tiny_spec(corpus, tmp / "tiny.duckdb", "sweep:\n  optimizer: [adamw, muon]\n  ffn_mult: [1, 2, 4]\n"))
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert result.exit_code == 0, result.output
    return spec, tmp / "tiny.duckdb", result


def test_inline_sweep_fills_every_table(inline_store):
    spec, db, result = inline_store
    c = counts(db)
    # 6 runs × steps {1, 3, 6}; spectra: × 2 layers × 2 sites × 4 strata
    assert c["runs"] == 6 and c["evals"] == 18 and c["spectra"] == 6 * 3 * 2 * 2 * 4
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT DISTINCT status FROM runs").fetchall() == [("done",)]
        assert c["ranks"] == con.execute("SELECT count(*) FROM spectra WHERE NOT skipped").fetchone()[0] > 0
        prov = con.execute("SELECT versions, host, started_at, finished_at FROM runs LIMIT 1").fetchone()
        assert "torch" in json.loads(prov[0]) and prov[1] and prov[3] >= prov[2]
        labels = con.execute("SELECT optimizer, count(*) FROM runs GROUP BY 1 ORDER BY 1").fetchall()
        assert labels == [("AdamW", 3), ("Muon", 3)]
    finally:
        con.close()
    assert "[6/6] done" in result.stderr


def test_query_beta_on_the_sweep(inline_store):
    _, db, _ = inline_store
    result = runner.invoke(app, ["query", "beta", "--stratum", "all", "--db", str(db), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["optimizer"] for r in rows] == ["AdamW", "Muon"]
    assert all(r["n_widths"] == 3 and r["beta_hard"] is not None for r in rows)
    table = runner.invoke(app, ["query", "beta", "--db", str(db)])
    assert "beta_hard" in table.stdout and "AdamW" in table.stdout


def test_second_run_skips_everything(inline_store):
    spec, db, _ = inline_store
    before = counts(db)
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert result.exit_code == 0 and "nothing to do: all 6 runs" in result.stderr
    assert counts(db) == before
    plan = runner.invoke(app, ["plan", str(spec), "--format", "json"])
    assert {r["status"] for r in json.loads(plan.stdout)} == {"done"}


def test_ray_sweep_matches_inline_bit_for_bit(inline_store, tmp_path, corpus):
    _, inline_db, _ = inline_store
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "ray.duckdb", "sweep:\n  optimizer: [adamw, muon]\n  ffn_mult: [1, 2, 4]\n"))
    # default executor: a local Ray instance, in a real process so Ray's own logging is seen too
    result = subprocess.run([sys.executable, "-m", "cli.main", "run", str(spec)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path / "ray.duckdb") == snapshot(inline_db)  # CPU runs are deterministic
    # stderr holds specdb's lines only (no Ray banner); each finished run names label, width and seed
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "6 runs to do (0 already in the store)" and lines[-1].startswith("stored 6 runs"), lines
    assert all(re.fullmatch(r"\[\d/6\] done +[0-9a-f]{16} (AdamW|Muon) ffn_mult=[124] seed=0 \(.*", x)
               for x in lines[1:-1]), lines


def test_failed_run_is_recorded_and_exit_code_is_3(tmp_path, corpus, monkeypatch):
    # the driver is told a GPU is visible (run refuses cuda without one), so the cuda run fails in its worker
    monkeypatch.setattr("spectraldb.run.preflight._local_gpus", lambda: 1)
    spec = tmp_path / "f.yaml"
    # no CUDA here: the cuda run fails inside its worker; the cpu run still completes
    spec.write_text(tiny_spec(corpus, tmp_path / "f.duckdb", "sweep:\n  zip:\n    - {seed: [0, 1], train.device: [cpu, cuda]}\n"))
    if __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert result.exit_code == 3, result.output
    con = duckdb.connect(str(tmp_path / "f.duckdb"), read_only=True)
    rows = con.execute("SELECT status, error FROM runs ORDER BY status").fetchall()
    con.close()
    assert [r[0] for r in rows] == ["done", "failed"] and "CUDA" in rows[1][1]


def test_query_while_a_sweep_is_writing(tmp_path, corpus):
    db = tmp_path / "w.duckdb"
    spec = tmp_path / "w.yaml"
    spec.write_text(tiny_spec(corpus, db, "sweep:\n  seed: [0, 1, 2, 3, 4, 5, 6, 7]\n  ffn_mult: [1, 2]\n", steps=3,
                              extra="").replace("every: 3", "every: 1"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    writer = subprocess.Popen([sys.executable, "-m", "cli.main", "run", str(spec), "--executor", "inline"],
                              env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    counts, rcs = [], []
    try:
        while writer.poll() is None:
            if db.exists():
                cmd = (["query", "beta"] if len(rcs) % 2 == 0 else ["sql", "SELECT count(*) AS n FROM runs"])
                q = subprocess.run([sys.executable, "-m", "cli.main", *cmd, "--db", str(db), "--format", "json"],
                                   capture_output=True, text=True, env=env, timeout=60)
                rcs.append((q.returncode, q.stderr))
                if q.returncode == 0 and cmd[0] == "sql":
                    counts.append(json.loads(q.stdout)[0]["n"])
            time.sleep(0.05)
    finally:
        out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert rcs, "the sweep finished before any query could run"
    assert all(rc == 0 for rc, _ in rcs), rcs
    # readers only ever see whole, committed runs: the count never goes back and never passes 16
    assert counts == sorted(counts) and all(0 <= n <= 16 for n in counts), counts


def test_readme_sql_examples_run_on_a_real_store(inline_store):
    from pathlib import Path

    _, db, _ = inline_store
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```sql")[1].split("```")[0]
    queries = [q.strip() for q in block.split(";") if q.strip()]
    assert len(queries) >= 5
    for q in queries:
        result = runner.invoke(app, ["sql", "--db", str(db), "--format", "json", "--", q])
        assert result.exit_code == 0, (q, result.output)
        assert json.loads(result.stdout), q  # every example returns rows on a real sweep


def test_the_store_opens_in_the_duckdb_1_x_cli(inline_store):
    """Stores use DuckDB 1.0's storage format: the README's SQL runs in the DuckDB 1.5.6 CLI
    (the `duckdb-cli` package of the test extra), not only in the Python package that wrote it."""
    import shutil
    import subprocess
    from pathlib import Path

    from spectraldb import store

    _, db, _ = inline_store
    with store.connect(db, read_only=True) as con:
        assert store.storage_version(con) == "v1.0.0+"
    with open(db, "rb") as f:
        assert int.from_bytes(f.read(20)[12:20], "little") == 64  # DuckDB's number for v1.0.0
    cli = shutil.which("duckdb")
    assert cli, "the DuckDB CLI (pip install duckdb-cli==1.5.6, in the test extra) is missing"
    version = subprocess.run([cli, "--version"], capture_output=True, text=True).stdout
    assert version.startswith("v1."), version
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("```sql")[1].split("```")[0]
    for q in [q.strip() for q in block.split(";") if q.strip()]:
        out = subprocess.run([cli, "-readonly", "-json", str(db), "-c", q], capture_output=True, text=True)
        assert out.returncode == 0 and json.loads(out.stdout), (q, out.stderr)


def test_a_run_forced_to_diverge_is_recorded_and_the_sweep_completes(tmp_path, corpus):
    spec = tmp_path / "d.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "d.duckdb",
                              "sweep:\n  zip:\n    - {seed: [0, 1], optimizer.lr: [0.003, 1.0e+8]}\n"))
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert result.exit_code == 3, result.output
    con = duckdb.connect(str(tmp_path / "d.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT lr, status, error FROM runs ORDER BY lr").fetchall()
        last = con.execute("SELECT max(e.step) FROM evals e JOIN runs r USING (run_id) WHERE r.status = 'diverged'").fetchone()[0]
        measured = con.execute("SELECT count(*) FROM spectra s JOIN runs r USING (run_id) WHERE r.status = 'diverged'").fetchone()[0]
    finally:
        con.close()
    assert [r[1] for r in rows] == ["done", "diverged"] and "diverged at step" in rows[1][2]
    assert last < 6 and measured > 0  # stopped early, its measurements before divergence kept
    status = runner.invoke(app, ["status", "--db", str(tmp_path / "d.duckdb")])
    assert "diverged" in status.stdout and "diverged at step" in status.stderr
    plan = runner.invoke(app, ["plan", str(spec), "--format", "json"])
    assert sorted(r["status"] for r in json.loads(plan.stdout)) == ["diverged", "done"]


def test_architecture_factors_are_typed_run_columns(tmp_path, corpus):
    spec = tmp_path / "a.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "a.duckdb", "sweep:\n  zip:\n    - {model.pos: [nope, learned], "
                              "model.norm: [post, pre], model.activation: [gelu, relu2]}\n", steps=3))
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert result.exit_code == 0, result.output
    con = duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True)
    rows = con.execute("SELECT pos, norm, postln_frac, activation FROM runs ORDER BY pos").fetchall()
    n_reinj = con.execute("SELECT count(*) FROM reinjection").fetchone()[0]
    con.close()
    assert rows == [("learned", "pre", 0.0, "relu2"), ("nope", "post", 1.0, "gelu")]
    assert n_reinj > 0


def test_the_perplexity_rule_applies_to_the_final_evaluation_and_is_named(tmp_path, corpus):
    """The study's threshold is on the final perplexity: a run above it mid-run but below it at the
    end is done; a run above it at the end is diverged, measured to the end, and says which rule."""
    def run_with(threshold, name):
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(tiny_spec(corpus, tmp_path / f"{name}.duckdb", extra=f"sweep:\n  train.diverged_ppl: [{threshold}]\n"))
        result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
        con = duckdb.connect(str(tmp_path / f"{name}.duckdb"), read_only=True)
        try:
            status, error = con.execute("SELECT status, error FROM runs").fetchone()
            ppl = [p for (p,) in con.execute("SELECT val_ppl FROM evals ORDER BY step").fetchall()]
            steps = con.execute("SELECT max(step) FROM spectra").fetchone()[0]
        finally:
            con.close()
        return result, status, error, ppl, steps

    _, status, _, ppl, _ = run_with(1000, "default")
    assert status == "done" and ppl[0] > ppl[-1]
    between = (ppl[0] + ppl[-1]) / 2  # above it at the first measured step, below it at the last
    result, status, error, _, _ = run_with(between, "mid")
    assert status == "done", error
    result, status, error, ppl_end, steps = run_with(ppl[-1] * 0.99, "end")
    assert result.exit_code == 3 and status == "diverged" and "rule: final val ppl" in error
    assert len(ppl_end) == len(ppl) and steps == 6  # measured to the end, nothing cut short


@pytest.mark.slow  # plans through every pre-training check: prepares the shipped corpus
def test_shipped_experiments_yaml_plans_the_headline_sweep(tmp_path):
    plan, _ = load_spec(ROOT / "experiments.yaml")
    assert len(plan.runs) == 8
    assert {r.label for r in plan.runs} == {"AdamW", "Muon"}
    assert sorted({r.model.ffn_mult for r in plan.runs}) == [1, 2, 4, 8]
    assert {(r.train.steps, r.measure.every, r.measure.tokens) for r in plan.runs} == {(1000, 200, 16384)}
    result = runner.invoke(app, ["plan", str(ROOT / "experiments.yaml"), "--db", str(tmp_path / "x.duckdb"),
                                 "--format", "json"])
    assert result.exit_code == 0
    assert "8 runs: 8 new" in result.stderr
    assert not (tmp_path / "x.duckdb").exists()  # planning writes nothing
