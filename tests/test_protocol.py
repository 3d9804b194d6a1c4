"""The study's protocol: the window per series, train-batch timing, protocol versions in a store."""

import json
from dataclasses import replace

import duckdb
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from spectraldb import store
from spectraldb.spec import RunSpec, load_spec
from tests.builders import ranked
from tests.conftest import put, tiny_spec
from workers.data import prepare
from workers.measurement import measure
from workers.model import GPT, GPTConfig
from contract.vocabulary import PROTOCOL
from workers.train import run as train_run

runner = CliRunner()


def series_result(ranks: dict, dim: int = 32):
    """ranks: (step, stratum) → hard rank of layer 0's post spectrum (None = stratum skipped)."""
    return ranked({(step, 0, stratum): r for (step, stratum), r in ranks.items()}, dim, sites=("post",), n_per_dim=50,
                  ppl=20.0)


def test_the_window_takes_each_series_last_k_measured_values(tmp_path):
    """TAIL skipped at the final step: its value is the median of its own last 2 values (6, 8),
    not of the run's last 2 steps (which would leave only 8)."""
    db = tmp_path / "w.duckdb"
    run = RunSpec.model_validate({"model": {"d_model": 32, "ffn_mult": 1}, "train": {"steps": 30},
                                  "measure": {"every": 10, "last_k": 2}})
    ranks = {(10, "all"): 10, (20, "all"): 12, (30, "all"): 14, (10, "tail"): 6, (20, "tail"): 8, (30, "tail"): None}
    store.write_run(db, run, series_result(ranks), {})
    with store.connect(db, read_only=True) as con:
        got = dict(con.execute("SELECT stratum, value FROM run_points WHERE metric = 'hard'").fetchall())
        window = con.execute("SELECT step, from_end FROM ranks WHERE stratum = 'tail' ORDER BY step").fetchall()
        layer = dict(con.execute("SELECT stratum, value FROM layer_points WHERE metric = 'hard'").fetchall())
        protocol = con.execute("SELECT protocol FROM runs").fetchone()[0]
    assert got["all"] == pytest.approx(13) and got["tail"] == pytest.approx(7)
    assert window == [(10, 2), (20, 1)] and layer == got and protocol == PROTOCOL


def by_hand(run, ds, *, until: int) -> dict:
    """The loop written out: {s: spectra of the weights after s updates, measured on batch s+1's
    first measure.tokens (strata) / measure.all_tokens (all) positions}, plus the final model."""
    from workers.optim import build_optimizers, lr_multiplier, set_lr
    from contract.sizes import is_measured

    cfg, m, T, B = run.worker_config(), run.model, run.data.context, run.train.batch_size
    torch.manual_seed(run.train.seed)
    rng = np.random.default_rng(run.train.seed)
    model = GPT(GPTConfig.from_run(cfg, ds.vocab_size))
    optimizers = build_optimizers(model, cfg.optimizer)
    strata = torch.from_numpy(ds.strata.astype(np.int64))

    def draw():
        starts = rng.integers(0, ds.train.size - T - 1, size=B)
        return torch.from_numpy(ds.train[starts[:, None] + np.arange(T + 1)].astype(np.int64))

    def spectra(x):
        ms = cfg.measure
        return measure(model, x, strata, sites=ms.sites, strata=ms.strata, min_tokens=ms.min_stratum_tokens,
                       limit=ms.tokens, all_limit=ms.pooled_tokens)

    out, batch = {}, draw()
    for s in range(1, until + 1):
        set_lr(optimizers, lr_multiplier(s, run.train.steps, run.train.warmup, run.train.warmdown))
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        batch = draw()  # the batch of update s+1: what the study measures step s on
        if is_measured(s, run.train.steps, run.measure.every):
            out[s] = spectra(batch[:, :-1])
    return {"spectra": out, "model": model}


def assert_same_spectra(got, expect):
    assert [(a.layer, a.site, a.stratum, a.n_tokens) for a in got] == \
        [(b.layer, b.site, b.stratum, b.n_tokens) for b in expect]
    for a, b in zip(got, expect):
        assert (a.eigenvalues is None) == (b.eigenvalues is None)
        if b.eigenvalues is not None:
            assert np.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10, atol=1e-14)


def protocol_run(tmp_path, corpus, steps=5, measure="tokens: 64, all_tokens: 96, source: train_batch"):
    spec = tmp_path / "t.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "t.duckdb", "", steps=steps).replace(
        "tokens: 1024", measure).replace("batch_size: 4", "batch_size: 8").replace("every: 3", "every: 2"))
    run = load_spec(spec)[0].runs[0]
    return run, prepare(run.worker_config().data)


def test_the_step_s_spectrum_is_of_the_weights_after_s_updates(tmp_path, corpus):
    """Protocol 3 on train_batch: step s (1, 2, 4 and the last, 5) equals a measurement taken by
    hand after s updates on the batch update s+1 learns from; the last step's is of the final
    weights, and its validation loss is of the same weights. `all` counts all_tokens positions,
    the strata measure.tokens."""
    from workers.train import evaluate
    from workers.data import eval_batch

    run, ds = protocol_run(tmp_path, corpus)
    res = train_run(run.worker_config(), ds)
    assert res.status == "done", res.error
    hand = by_hand(run, ds, until=run.train.steps)
    assert sorted({r.step for r in res.spectra}) == sorted(hand["spectra"]) == [1, 2, 4, 5]
    for s, expect in hand["spectra"].items():
        assert_same_spectra([r for r in res.spectra if r.step == s], expect)
    last = [r for r in res.spectra if r.step == 5]
    assert {r.n_tokens for r in last if r.stratum == "all"} == {96}
    assert all(sum(r.n_tokens for r in last if r.stratum != "all" and (r.layer, r.site) == key) == 64
               for key in {(r.layer, r.site) for r in last})
    windows = torch.from_numpy(eval_batch(ds, run.train.eval_tokens, run.data.context).astype(np.int64))
    assert res.final.step == 5 and res.final.val_loss == pytest.approx(evaluate(hand["model"], windows, None),
                                                                        rel=1e-12)


def test_a_resumed_run_measures_the_step_it_saved_on_the_next_batch(tmp_path, corpus):
    """A checkpoint at step 2 (a measured step) is taken before step 2's spectrum exists (it needs
    batch 3): the resumed run measures it first, and ends with the uninterrupted run's spectra."""
    from workers import train as train_module

    run, ds = protocol_run(tmp_path, corpus)
    cfg = replace(run.worker_config(), checkpoint_every=2)
    whole = train_run(run.worker_config(), ds)
    ckpt = tmp_path / "c.pt"
    calls = []

    def stop_after_2(step, steps):
        calls.append(step)
        if step == 3:
            raise KeyboardInterrupt  # the process dies after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train_module.run(cfg, ds, stop_after_2, checkpoint=ckpt)
    resumed = train_run(cfg, ds, checkpoint=ckpt)
    assert resumed.resumed_from == 2
    key = lambda r: (r.step, r.layer, r.site, r.stratum)  # noqa: E731
    assert_same_spectra(sorted(resumed.spectra, key=key), sorted(whole.spectra, key=key))


def test_the_pooled_spectrum_is_never_skipped_for_want_of_tokens(tmp_path, corpus):
    """min_stratum_tokens above every count: the strata are skipped (kept as records without
    eigenvalues), the pooled spectrum is measured anyway."""
    run, ds = protocol_run(tmp_path, corpus, measure="tokens: 64, source: train_batch")
    run = run.model_copy(update={"measure": run.measure.model_copy(update={"min_stratum_tokens": 100000})})
    res = train_run(run.worker_config(), ds)
    assert res.status == "done", res.error
    assert {r.stratum for r in res.spectra if r.eigenvalues is not None} == {"all"}
    assert {r.stratum for r in res.spectra if r.eigenvalues is None} == {"head", "mid", "tail"}


def test_the_protocol_is_part_of_the_run_id(monkeypatch):
    from spectraldb.spec import models

    now = RunSpec.model_validate({})
    assert PROTOCOL == 3 and now.measure.last_k == 5
    current = now.run_id
    monkeypatch.setattr(models, "PROTOCOL", 4)
    assert now.run_id != current


def test_a_store_of_the_old_protocol_is_migrated_kept_and_never_pooled(tmp_path):
    """A schema-5 store (protocol 1, the run-wide window) gains runs.protocol = 1 and the
    per-series window; fits over old and new runs together are split by protocol, with a note."""
    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
    for number, name, sql in store.migrations():
        if number <= 5:
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [number, name])
    con.close()
    new = tmp_path / "new.duckdb"
    for mult in (1, 2, 4):  # AdamW, current protocol: rank D/4 (β 1)
        put(new, mult=mult, rank_of=lambda D, step, layer: D / 4)
    con = duckdb.connect(str(old))
    con.execute(f"ATTACH '{new}' AS n (READ_ONLY)")
    cols = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'runs' "
                                      "AND table_catalog = 'old' ORDER BY ordinal_position").fetchall()]
    con.execute(f"INSERT INTO runs SELECT {', '.join(cols)} FROM n.runs")
    con.execute("UPDATE runs SET run_id = 'old-' || run_id")  # the same sweep, measured under protocol 1
    for table in ("evals", "spectra", "reinjection"):
        con.execute(f"INSERT INTO {table} SELECT * REPLACE ('old-' || run_id AS run_id) FROM n.{table}")
    con.execute("INSERT INTO ranks SELECT * REPLACE ('old-' || run_id AS run_id, 99 AS from_end) FROM n.ranks")
    con.execute("UPDATE ranks SET from_end = 100 - step / 100")  # the run-wide numbering of old stores
    con.close()
    store.migrate(old)
    with store.connect(old, read_only=True) as con:
        assert con.execute("SELECT DISTINCT protocol FROM runs").fetchall() == [(1,)]
        assert con.execute("SELECT max(from_end) FROM ranks").fetchone()[0] == 3
        assert con.execute("SELECT count(*) FROM run_points").fetchone()[0] > 0
    for mult in (1, 2, 4):  # the current protocol's runs land beside them, with rank D/8 (β 1 too)
        put(old, mult=mult, rank_of=lambda D, step, layer: D / 8)
    result = runner.invoke(app, ["query", "beta", "--db", str(old), "--format", "json"])
    rows = json.loads(result.stdout)
    assert [(r["optimizer"], r["protocol"]) for r in rows] == [("AdamW", 1), ("AdamW", PROTOCOL)]
    assert f"runs of protocols 1, {PROTOCOL} are fitted separately" in result.stderr
    only = runner.invoke(app, ["query", "beta", "--db", str(old), "--format", "json", "--where",
                               f"protocol = {PROTOCOL}"])
    assert "protocol" not in json.loads(only.stdout)[0] and "fitted separately" not in only.stderr
    status = runner.invoke(app, ["status", "--db", str(old), "--format", "json"])
    assert "protocol 1" in status.stderr


def test_the_layer_points_view_equals_the_one_definition(tmp_path):
    """layer_points is SQL frozen in a migration; the store and the queries use points.point_ctes.
    On a store with skipped strata and several layers, the two give the same values."""
    from spectraldb.points import point_ctes
    from spectraldb.predicates import METRICS

    db = tmp_path / "v.duckdb"
    for mult in (1, 2):
        put(db, mult=mult, layers=3, rank_of=lambda D, step, layer: D / (2 + layer + step / 100))
    run = RunSpec.model_validate({"model": {"d_model": 32, "ffn_mult": 1}, "train": {"steps": 30, "seed": 9},
                                  "measure": {"every": 10, "last_k": 2}})
    store.write_run(db, run, series_result({(10, "tail"): 6, (20, "tail"): 8, (30, "tail"): None,
                                            (10, "all"): 9, (20, "all"): 9, (30, "all"): 11}), {})
    sql = f"""WITH sel AS (SELECT run_id, last_k FROM runs),
              {point_ctes(list(METRICS.values()), by_site=True, by_layer=True)}
              SELECT run_id, layer, site, stratum, metric, value
              FROM (UNPIVOT per_run ON {", ".join(f'm{i} AS "{n}"' for i, n in enumerate(METRICS))}
                    INTO NAME metric VALUE value) ORDER BY ALL"""
    with store.connect(db, read_only=True) as con:
        built = con.execute(sql).fetchall()
        view = con.execute("SELECT run_id, layer, site, stratum, metric, value FROM layer_points ORDER BY ALL").fetchall()
    assert len(built) == len(view) > 100
    assert all(a[:5] == b[:5] and a[5] == pytest.approx(b[5], rel=1e-12) for a, b in zip(built, view))


def test_step_points_answer_dynamics_as_the_ranks_do(tmp_path):
    """query dynamics reads step_points (written with each run); aggregating the rank rows at
    query time gives the same values."""
    from spectraldb import values

    db = tmp_path / "d.duckdb"
    for mult in (1, 2, 4):
        put(db, mult=mult, layers=3, strata={"all": 1.0, "tail": 0.5},
            rank_of=lambda D, step, layer: D / (2 + layer + step / 100))
    with store.connect(db, read_only=True) as con:
        for stratum in ("all", "tail"):
            fast = values.run_values(con, ("hard", "soft", "renyi:3"), stratum=stratum, by_step=True)
            slow = values.run_values(con, ("hard", "soft", "renyi:3"), stratum=stratum, by_step=True, window=99)
            key = lambda v: (v.run_id, v.step)  # noqa: E731
            assert [key(v) for v in sorted(fast, key=key)] == [key(v) for v in sorted(slow, key=key)]
            for a, b in zip(sorted(fast, key=key), sorted(slow, key=key)):
                assert a.values == pytest.approx(b.values, rel=1e-12)
        assert con.execute("SELECT count(DISTINCT step) FROM step_points").fetchone()[0] == 3
