"""The measurement path (issue 9): SYRK products, batched decomposition, the overlapped
thread, metrics computed in the worker, the precision policy."""

import copy
from dataclasses import replace
import threading

import duckdb
import numpy as np
import pytest
import torch

from spectraldb import store
from spectraldb.spec import load_spec
from tests import conftest
from tests.conftest import tiny_spec
from workers import extract, measurement, train
from workers.bench import naive
from workers.data import prepare

KW = dict(sites=("pre", "post"), strata=("all", "head", "mid", "tail"), min_tokens=20)


def tiny_model(seed=0, ffn_mult=2):
    return conftest.tiny_model(seed, vocab_size=60, context=8, ffn_mult=ffn_mult)


def test_the_cpu_syrk_product_equals_a_matmul_on_its_upper_triangle():
    x = torch.randn(300, 40, dtype=torch.float64) + 3.0
    for dtype in (torch.float64, torch.float32):
        got = extract.gram(x.to(dtype))
        want = x.to(dtype).mT @ x.to(dtype)
        assert got.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(torch.triu(got), torch.triu(want), rtol=tol, atol=tol * float(want.abs().max()))


def test_the_batched_decomposition_equals_the_per_matrix_one_bitwise():
    rng = np.random.default_rng(0)
    mats = []
    for d in (24, 24, 10, 24, 10):  # two sizes, interleaved: grouped by size, returned in order
        x = torch.from_numpy(rng.standard_normal((60, d)))
        mats.append(torch.triu(x.mT @ x / 59))
    batched = extract.spectra_of(mats)
    for m, (eig, low) in zip(mats, batched):
        one_eig, one_low = extract.spectra_of([m])[0]
        assert np.array_equal(eig, one_eig) and low == one_low
        full = extract.symmetric(m).numpy()
        np.testing.assert_allclose(eig, np.sort(np.linalg.eigvalsh(full))[::-1].clip(1e-12), rtol=1e-9, atol=1e-12)


def test_batches_are_split_to_bound_their_memory(monkeypatch):
    rng = np.random.default_rng(1)
    mats = [torch.triu(torch.from_numpy(rng.standard_normal((30, 12))).mT @ torch.from_numpy(rng.standard_normal((30, 12))))
            for _ in range(5)]
    whole = extract.spectra_of(mats)
    sizes = []
    eigvalsh = torch.linalg.eigvalsh
    monkeypatch.setattr(extract, "BATCH_BYTES", 2 * 8 * 12 * 12)  # two matrices per batch
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda b, UPLO: sizes.append(len(b)) or eigvalsh(b, UPLO=UPLO))
    split = extract.spectra_of(mats)
    assert sizes == [2, 2, 1]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(whole, split))


def test_the_fp64_measurement_equals_the_naive_reference_within_1e_9():
    model = tiny_model()
    tokens = torch.randint(0, 60, (40, 8), generator=torch.Generator().manual_seed(1))
    strata_of = torch.arange(60) % 3
    got = measurement.measure(model, tokens, strata_of, **KW, chunk=7)  # uneven chunks
    ref = naive(model, tokens, strata_of)  # every activation kept, numpy.cov, numpy eigvalsh
    assert len(got) == 16
    for rec in got:
        want, metrics = ref[(rec.layer, rec.site, rec.stratum)]
        for name, value in metrics.items():
            if name != "renyi_0_5":  # R_0.5 weighs the numerical floor: checked apart below
                assert rec.metrics[name] == pytest.approx(value, rel=1e-9), name
        top = want > want[0] * 1e-8
        np.testing.assert_allclose(rec.eigenvalues[top], want[top], rtol=1e-9)


def test_fp32_products_stay_close_and_differ_from_fp64():
    model = tiny_model()
    tokens = torch.randint(0, 60, (40, 8), generator=torch.Generator().manual_seed(1))
    strata_of = torch.arange(60) % 3
    a = measurement.measure(model, tokens, strata_of, **KW)
    b = measurement.measure(model, tokens, strata_of, **KW, precision="fp32")
    assert any(not np.array_equal(x.eigenvalues, y.eigenvalues) for x, y in zip(a, b))
    for x, y in zip(a, b):
        assert y.metrics["hard_rank"] == pytest.approx(x.metrics["hard_rank"], rel=1e-4)


def test_the_products_never_run_under_the_forward_autocast(monkeypatch):
    """On a GPU the forward runs under bfloat16 autocast, and the hooks inside it: a float32
    product there would silently become a bfloat16 one (the build before issue 9 did that)."""
    gram, seen = extract.gram, []

    def watched(xc):
        seen.append((torch.is_autocast_enabled("cpu"), xc.dtype))
        return gram(xc)

    monkeypatch.setattr(extract, "gram", watched)
    model = tiny_model()
    measurement.accumulate(model, torch.randint(0, 60, (10, 8)), torch.arange(60) % 3, **KW,
                       autocast_dtype=torch.bfloat16, precision="fp32")
    assert seen and all(state == (False, torch.float32) for state in seen)


def test_non_finite_activations_are_caught_before_any_decomposition(monkeypatch):
    model = tiny_model()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    calls = []
    monkeypatch.setattr(extract, "spectra_of", lambda *a: calls.append(a))
    with pytest.raises(extract.NonFiniteActivations):
        measurement.accumulate(model, torch.randint(0, 60, (10, 8)), torch.arange(60) % 3, **KW)
    assert not calls


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("meas")
    spec = folder / "m.yaml"
    spec.write_text(tiny_spec(corpus, folder / "m.duckdb", "", steps=7))
    run = load_spec(spec)[0].runs[0]
    return run, prepare(run.worker_config().data)


def same_results(a, b):
    assert a.status == b.status == "done"
    assert a.evals == b.evals
    assert len(a.spectra) == len(b.spectra) > 0
    for x, y in zip(a.spectra, b.spectra):
        assert {k: v for k, v in x.to_dict().items() if k != "eigenvalues"} == \
            {k: v for k, v in y.to_dict().items() if k != "eigenvalues"}
        assert (x.eigenvalues is None) == (y.eigenvalues is None)
        if x.eigenvalues is not None:
            assert np.array_equal(x.eigenvalues, y.eigenvalues)


@pytest.mark.parametrize("source", ["heldout", "train_batch"])
def test_the_overlapped_run_returns_exactly_what_the_synchronous_run_returns(tiny_run, source):
    run, ds = tiny_run
    config = run.worker_config()
    config = replace(config, measure=replace(config.measure, source=source))
    same_results(train.run(config, ds, overlap=True), train.run(config, ds, overlap=False))


def test_the_training_loop_does_not_wait_for_a_decomposition(tiny_run, monkeypatch):
    """The first decomposition blocks until the loop reports a later step: only an overlapped
    loop can get there (a synchronous one would wait the full timeout and record it)."""
    run, ds = tiny_run
    later = threading.Event()
    waited = []
    decompose = extract.decompose

    def slow(selected, precision, step, which):
        if not waited:
            waited.append(later.wait(timeout=20))
        return decompose(selected, precision, step, which)

    monkeypatch.setattr(train, "decompose", slow)
    result = train.run(run.worker_config(), ds, progress=lambda step, steps: step >= 2 and later.set())
    assert result.status == "done" and waited == [True]
    assert [r.step for r in result.spectra] == sorted(r.step for r in result.spectra)


def test_a_failing_decomposition_fails_the_run_and_keeps_the_earlier_steps(tiny_run, monkeypatch):
    run, ds = tiny_run
    decompose, calls = extract.decompose, []

    def second_fails(selected, precision, step, which):
        calls.append(1)
        if len(calls) == 2:
            raise np.linalg.LinAlgError("eigensolver did not converge")
        return decompose(selected, precision, step, which)

    monkeypatch.setattr(train, "decompose", second_fails)
    result = train.run(run.worker_config(), ds)
    assert result.status == "failed" and "did not converge" in result.error
    assert {r.step for r in result.spectra} == {1}


def ranks_and_reinjection(db):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return [con.execute(f"SELECT * EXCLUDE (run_id) FROM {t} ORDER BY ALL").fetchall()
                for t in ("ranks", "reinjection", "run_points", "spectra")]
    finally:
        con.close()


def test_the_driver_stores_worker_metrics_identical_to_its_own(tiny_run, tmp_path):
    run, ds = tiny_run
    result = train.run(run.worker_config(), ds)
    assert all(r.metrics is not None for r in result.spectra if r.eigenvalues is not None)
    assert any(r.reinjection is not None for r in result.spectra)
    bare = copy.deepcopy(result)  # what an older worker (or a spooled result) hands over
    for r in bare.spectra:
        r.metrics = r.reinjection = None
    store.write_run(tmp_path / "w.duckdb", run, result, {})
    store.write_run(tmp_path / "d.duckdb", run, bare, {})
    assert ranks_and_reinjection(tmp_path / "w.duckdb") == ranks_and_reinjection(tmp_path / "d.duckdb")


def test_precision_is_a_spec_field_that_changes_the_run_id_only_when_set(tmp_path, corpus):
    base = tiny_spec(corpus, tmp_path / "p.duckdb", "")
    (tmp_path / "a.yaml").write_text(base)
    (tmp_path / "b.yaml").write_text(base.replace("min_stratum_tokens: 20}", "min_stratum_tokens: 20, precision: fp64}"))
    (tmp_path / "c.yaml").write_text(base.replace("min_stratum_tokens: 20}", "min_stratum_tokens: 20, precision: fp32}"))
    ids = [load_spec(tmp_path / f"{n}.yaml")[0].runs[0].run_id for n in "abc"]
    assert ids[0] == ids[1] != ids[2]


def test_a_spooled_result_keeps_the_worker_metrics_exactly(tiny_run, tmp_path):
    from spectraldb.sidecar.spool import Spool

    run, ds = tiny_run
    result = train.run(run.worker_config(), ds)
    spool = Spool(tmp_path / "s.duckdb")
    back = Spool.load(spool.put(run.run_id, run.config(), result, {}, "tiny"))["result"]
    assert [r.metrics for r in back.spectra] == [r.metrics for r in result.spectra]
    store.write_run(tmp_path / "direct.duckdb", run, result, {})
    store.write_run(tmp_path / "s.duckdb", run, back, {})
    assert ranks_and_reinjection(tmp_path / "s.duckdb") == ranks_and_reinjection(tmp_path / "direct.duckdb")
