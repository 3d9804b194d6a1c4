"""Runs trained elsewhere, tracked into the store: factors of their own, the one writer, the verbs."""

import json

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb.errors import SpecError
from spectraldb.sidecar.lock import WriterLock
from spectraldb.sidecar.spool import Spool
from spectraldb.track import track
from tests.builders import spectrum
from tests.conftest import flat, query, rows, start_sweep

runner = CliRunner()
WIDTHS = (64, 128, 256, 512)


def spectra_at(step, D, rank):
    return [spectrum(step, layer, site, "all", flat(rank, D), 50 * D) for layer in (0, 1) for site in ("pre", "post")]


def tracked(db, *, optimizer="AdamW", D=64, beta=0.5, factors=None, seed=0, steps=300, **kw):
    """One tracked run whose hard rank is 0.5·D^beta at steps 200 and 300."""
    with track(db, optimizer=optimizer, d_model=32, n_layer=2, ffn_width=D, seed=seed, steps=steps,
               factors=factors, last_k=2, **kw) as run:
        for step in (200, 300):
            run.log(step, spectra_at(step, D, 0.5 * D**beta), train_loss=3.0, val_loss=3.2)
    return run



def test_tracked_runs_answer_the_verbs_with_their_own_factors(tmp_path):
    db = tmp_path / "t.duckdb"
    for dataset, beta in (("web", 0.5), ("code", 0.8)):
        for D in WIDTHS:
            assert tracked(db, D=D, beta=beta, factors={"dataset": dataset, "wd": 0.1 if dataset == "web" else 0.0},
                           lr=3e-4).outcome == "committed"
    found, _ = query(db, "beta", "--by", "optimizer,dataset")
    got = {r["dataset"]: r["beta_hard"] for r in found}
    assert got == {"code": pytest.approx(0.8, abs=2e-3), "web": pytest.approx(0.5, abs=2e-3)}
    found, _ = query(db, "beta", "--where", "dataset = 'web' AND wd > 0.05 AND lr = 3e-4")
    assert len(found) == 1 and found[0]["beta_hard"] == pytest.approx(0.5, abs=2e-3) and found[0]["n_widths"] == 4
    assert rows(db, "SELECT DISTINCT source, gated, measure_source FROM runs") == [("tracked", False, "tracked")]
    _, err = query(db, "beta", "--by", "colour", code=2)
    assert err.startswith("--by: unknown factor 'colour'") and "dataset" in err and "wd" in err
    status = runner.invoke(app, ["status", "--db", str(db), "--format", "json"])
    assert json.loads(status.stdout)[0]["runs"] == 8


def test_the_same_declaration_is_the_same_run(tmp_path):
    db = tmp_path / "t.duckdb"
    first, again = tracked(db, D=64), tracked(db, D=64)
    other = tracked(db, D=64, seed=1)
    assert first.run_id == again.run_id != other.run_id
    assert rows(db, "SELECT count(*) FROM runs") == [(2,)]


@pytest.mark.parametrize("kw, message", [
    (dict(factors={"Bad Name": 1}), "factors: 'Bad Name' is not a factor name"),
    (dict(factors={"status": "x"}), "factors: 'status' is a built-in column"),
    (dict(factors={"wd": float("nan")}), "factors"),
    (dict(ffn_width=None), "give ffn_width"),
    (dict(colour="red"), "track: unknown field 'colour'"),
    (dict(d_model=0), "model.d_model"),
    (dict(tokens_seen=2**70), "tokens_seen"),
    (dict(factors={"wd": 10**30}), "does not fit 64 bits"),
    (dict(factors={f"f{i}": i for i in range(65)}), "factors"),
])
def test_a_bad_declaration_is_one_line_and_writes_nothing(tmp_path, kw, message):
    db = tmp_path / "t.duckdb"
    args = dict(optimizer="AdamW", d_model=32, n_layer=2, ffn_width=64, steps=10) | kw
    with pytest.raises(SpecError, match=message) as err:
        track(db, **args)
    assert "\n" not in str(err.value) and not db.exists()


def test_non_finite_activations_store_a_diverged_run_with_what_it_had(tmp_path):
    from workers.extract import NonFiniteActivations

    class Exploding:
        calls = 0

        def compute(self, step):
            Exploding.calls += 1
            if Exploding.calls == 2:
                raise NonFiniteActivations("non-finite FFN activations")
            return spectra_at(step, 64, 8)

    db = tmp_path / "t.duckdb"
    with track(db, optimizer="AdamW", d_model=32, n_layer=2, ffn_width=64, steps=300) as run:
        for step in (100, 200, 300):
            run.log(step, probe=Exploding(), train_loss=3.0, val_loss=3.0)
    (status, error), = rows(db, "SELECT status, error FROM runs")
    assert status == "diverged" and "step 200" in error
    assert rows(db, "SELECT DISTINCT step FROM spectra") == [(100,)]


def test_a_failing_loop_stores_a_failed_run_with_its_traceback(tmp_path):
    db = tmp_path / "t.duckdb"
    with pytest.raises(RuntimeError):
        with track(db, optimizer="AdamW", d_model=32, n_layer=2, ffn_width=64, steps=10) as run:
            run.log(5, spectra_at(5, 64, 8))
            raise RuntimeError("CUDA out of memory")
    (status, error), = rows(db, "SELECT status, error FROM runs")
    assert status == "failed" and "CUDA out of memory" in error and "Traceback" in error


def test_a_run_tracked_while_a_writer_holds_the_store_is_spooled_then_ingested_once(tmp_path):
    db = tmp_path / "t.duckdb"
    tracked(db, D=64)  # the store exists
    with WriterLock(db):
        run = tracked(db, D=128)
        assert run.outcome == "spooled" and Spool(db).run_ids() == {run.run_id}
    for expected in (1, 0):
        result = runner.invoke(app, ["ingest", "--db", str(db)])
        assert result.exit_code == 0 and f"committed {expected} finished run(s)" in result.stderr
    assert rows(db, "SELECT count(*), count(DISTINCT run_id) FROM runs") == [(2, 2)]
    assert not Spool(db).pending()


@pytest.mark.slow
def test_a_run_tracked_during_a_sweep_is_committed_by_that_sweep_exactly_once(tmp_path, corpus):
    proc, db, _ = start_sweep(tmp_path, corpus, steps=30, every=10)
    try:
        run = tracked(db, D=64)
        assert run.outcome == "spooled"
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert rows(db, f"SELECT count(*) FROM runs WHERE run_id = '{run.run_id}'") == [(1,)]
    assert rows(db, "SELECT source, count(*) FROM runs GROUP BY ALL ORDER BY 1") == [("specdb", 3), ("tracked", 1)]
    assert not Spool(db).pending()


@pytest.mark.slow
def test_tracked_runs_give_the_beta_of_the_same_runs_trained_by_specdb(tiny):
    """The tiny sweep trained by `specdb run`, and the same runs trained by the worker's loop and
    recorded by a tracker: the same β, to the last digit."""
    from spectraldb.spec import load_spec
    from workers.data import prepare
    from workers.train import run as train_run

    spec, db = tiny
    assert runner.invoke(app, ["run", str(spec), "--executor", "inline"]).exit_code == 0
    tracked_db = db.with_name("tracked.duckdb")
    for r in load_spec(spec)[0].runs:
        ds = prepare(r.worker_config().data)
        res = train_run(r.worker_config(), ds)
        with track(tracked_db, optimizer=r.label, d_model=r.model.d_model, n_layer=r.model.n_layer,
                   ffn_width=r.model.ffn_width, seed=r.train.seed, steps=r.train.steps, last_k=r.measure.last_k,
                   vocab_size=ds.vocab_size) as run:
            losses = {e.step: e for e in res.evals}
            for step in sorted({s.step for s in res.spectra}):
                e = losses.get(step)
                run.log(step, [s for s in res.spectra if s.step == step],
                        train_loss=e.train_loss if e else None, val_loss=e.val_loss if e else None)
    for args in (["--stratum", "all"], ["--stratum", "tail"]):
        ours, _ = query(db, "beta", *args)
        theirs, _ = query(tracked_db, "beta", *args)
        keys = ("optimizer", "beta_hard", "beta_soft", "r2_hard", "n_widths")
        assert [{k: r[k] for k in keys} for r in theirs] == [{k: r[k] for k in keys} for r in ours]
        assert all(r["beta_hard"] is not None for r in ours)


def test_the_service_and_the_views_answer_tracked_runs(tmp_path):
    from fastapi.testclient import TestClient

    from spectraldb.service import create_app

    db = tmp_path / "t.duckdb"
    for D in WIDTHS[:3]:
        tracked(db, D=D, factors={"dataset": "web"})
    client = TestClient(create_app(db), base_url="http://localhost")
    beta = client.get("/api/beta", params={"by": "optimizer,dataset"}).json()
    assert beta["rows"][0]["dataset"] == "web" and beta["rows"][0]["beta_hard"] == pytest.approx(0.5, abs=2e-3)
    runs = client.get("/api/runs").json()
    assert runs["total"] == 3 and {r["n_head"] for r in runs["rows"]} == {None}
    one = client.get(f"/api/runs/{runs['rows'][0]['run_id']}").json()
    assert one["run"]["source"] == "tracked" and one["run"]["factors"] == '{"dataset": "web"}' and one["ranks"]
    series = client.get("/api/scaling").json()["series"]["hard"]
    assert series[0]["beta"] == pytest.approx(0.5, abs=2e-3) and series[0]["line"] is not None
    assert client.get("/api/status").json()["runs"] == {"done": 3}
    assert rows(db, "SELECT count(*) FROM betas WHERE metric = 'hard' AND stratum = 'all' AND site = 'post'") == [(1,)]


def test_under_data_parallelism_only_rank_0_writes(tmp_path, monkeypatch):
    import sys
    import types

    db = tmp_path / "t.duckdb"
    fake = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_rank=lambda: 1)
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    assert tracked(db, D=64).outcome == "not written (rank 1)" and not db.exists()
    fake.get_rank = lambda: 0
    assert tracked(db, D=64).outcome == "committed"


def test_a_hand_edited_store_with_hostile_factor_keys_still_answers(tmp_path):
    """Keys that are not factor names, and keys past the bound, are never read."""
    db = tmp_path / "t.duckdb"
    for D in WIDTHS[:3]:
        tracked(db, D=D, factors={"dataset": "web"})
    hostile = {"x'); DROP TABLE runs; --": 1, "Upper": 2, **{f"k{i:03d}": i for i in range(100)}, "dataset": "web"}
    con = duckdb.connect(str(db))
    con.execute("UPDATE runs SET factors = ?", [json.dumps(hostile)])
    con.close()
    found, _ = query(db, "beta", "--by", "optimizer,dataset")
    assert found[0]["dataset"] == "web" and found[0]["n_widths"] == 3
    from spectraldb.predicates import MAX_FACTORS, declared_factors
    from spectraldb.store import connect

    with connect(db, read_only=True) as con:
        declared = declared_factors(con)
    assert len(declared) == MAX_FACTORS and "Upper" not in declared and "dataset" in declared


def test_a_tracked_run_stores_where_its_probe_measured(tmp_path):
    import torch

    from tests.conftest import tiny_model
    from workers.probe import attach

    model = tiny_model()
    probe = attach(model, strata=("all",), min_tokens=2)
    db = tmp_path / "w.duckdb"
    with track(db, optimizer="AdamW", d_model=16, n_layer=2, ffn_width=64, steps=1) as run:
        ids = torch.randint(0, 64, (4, 16))
        with torch.no_grad(), probe.measuring(ids):
            model.hidden(ids)
        run.log(1, probe=probe)
    assert rows(db, "SELECT device, forward_dtype FROM runs") == [("cpu", "float32")]
