"""The worker↔driver contract: records that survive Ray and the spool, one vocabulary, one size rule."""

import json
import math

import numpy as np
import pytest

from contract import metrics, vocabulary
from contract.records import Evaluation, RunResult, Spectrum
from tests.builders import evaluations, result, spectrum


def test_a_result_survives_to_dict_and_back_exactly():
    res = result("diverged", [spectrum(3, 0, "post", "all", [3.0, 2.0, 1.0], 30),
                              spectrum(3, 0, "pre", "tail", None, 0, n_dim=3)],
                 evaluations([3], 4.0, 4.1, 60.3), error="diverged at step 3")
    metrics.attach_metrics(res.spectra)
    back = RunResult.from_dict(res.to_dict())
    assert back.status == "diverged" and back.error == res.error and back.evals == res.evals
    assert [s.key for s in back.spectra] == [s.key for s in res.spectra]
    assert np.array_equal(back.spectra[0].eigenvalues, res.spectra[0].eigenvalues)
    assert back.spectra[0].metrics == res.spectra[0].metrics and back.spectra[1].is_skipped
    json.dumps({k: v for k, v in res.to_dict().items() if k != "spectra"})  # plain values, for JSON and Ray


def test_a_failed_result_has_nothing_but_its_error():
    res = RunResult.failed("WorkerCrashedError: the worker died")
    assert res.status == "failed" and res.evals == [] and res.spectra == [] and res.duration_s == pytest.approx(0, abs=1)
    assert res.final is None and res.protocol == vocabulary.PROTOCOL


def test_a_result_spooled_by_an_older_version_still_reads():
    """Older results carried the driver's vocab_size inside and no metrics: both are tolerated."""
    old = {"status": "done", "started_at": 0.0, "finished_at": 1.0, "vocab_size": 300,
           "evals": [{"step": 1, "train_loss": 3.0, "val_loss": 3.0, "val_ppl": 20.0}],
           "spectra": [{"step": 1, "layer": 0, "site": "post", "stratum": "all", "n_tokens": 10, "n_dim": 2,
                        "eigenvalues": [2.0, 1.0], "min_eigenvalue": 0.5}]}
    res = RunResult.from_dict(old)
    assert not hasattr(res, "vocab_size") and res.evals == [Evaluation(1, 3.0, 3.0, 20.0)]
    assert res.spectra[0].metrics is None
    metrics.attach_metrics(res.spectra)
    assert res.spectra[0].metrics["hard_rank"] == pytest.approx(metrics.hard_rank([2.0, 1.0]))


def test_a_skipped_spectrum_is_explicit():
    s = Spectrum.skipped(step=1, layer=0, site="pre", stratum="head", n_tokens=3, n_dim=8)
    assert s.is_skipped and s.eigenvalues is None and s.min_eigenvalue is None
    metrics.attach_metrics([s])
    assert s.metrics is None


def test_the_vocabulary_is_built_once_from_the_renyi_orders():
    assert vocabulary.STRATA == ("all", *vocabulary.MEASURED_STRATA)
    assert vocabulary.PLAN_STATUSES == ("new", "spooled", "done", "diverged", "failed")
    assert set(vocabulary.FINISHED) < set(vocabulary.STATUSES)
    renyi = [m for m in vocabulary.METRICS if m.startswith("renyi:")]
    assert len(renyi) == len(vocabulary.RENYI_ALPHAS) and "renyi:inf" in renyi and "renyi:0.5" in renyi
    assert set(vocabulary.METRICS.values()) <= set(vocabulary.RANK_COLUMNS)
    assert list(metrics.metrics(np.ones(4))) == list(vocabulary.RANK_COLUMNS)
    assert list(metrics.reinjection(np.ones(4), np.ones(4))) == list(vocabulary.REINJECTION_COLUMNS)


# spec fields the driver keeps for itself (stored, hashed, read by queries), never sent to a worker
DRIVER_ONLY = {"measure": {"last_k", "all_tokens", "reduction", "keep_eigenvalues"},
               "resources": {"max_retries", "collective_timeout_s"}, "optimizer": {"label"}}


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "normuon", "dion"])
def test_every_spec_field_reaches_the_worker_record_by_name_and_resolved_values_are_filled(optimizer):
    """A field added to a spec section and not to its contract record (or the reverse) fails here."""
    import dataclasses

    from contract import config as records
    from spectraldb.spec import RunSpec

    spec = RunSpec.model_validate({"optimizer": {"name": optimizer}, "measure": {"tokens": 4096, "all_tokens": 8192},
                                   "checkpoint": {"every": 7}})
    config = spec.worker_config()
    resolved = {"measure": {"pooled_tokens"}}
    for section in ("data", "model", "train", "optimizer", "measure", "resources"):
        spec_fields = set(type(getattr(spec, section)).model_fields) - DRIVER_ONLY.get(section, set())
        record_fields = {f.name for f in dataclasses.fields(getattr(config, section))} - resolved.get(section, set())
        assert spec_fields == record_fields, section
    assert config.measure.pooled_tokens == 8192 and config.checkpoint_every == 7
    assert isinstance(config.optimizer, records.OPTIMIZER_CONFIGS[optimizer])
    if optimizer != "adamw":
        assert config.optimizer.scalar_lr == config.optimizer.lr  # resolved: the spec left it out
    assert RunSpec.model_validate({}).worker_config().checkpoint_every is None
    assert isinstance(config.measure.sites, tuple) and hash(config)  # plain, frozen values


def test_metric_functions_are_pure_and_keep_their_invariants():
    eig = np.array([5.0, 2.0, 1.0, 0.5])
    assert 1 <= metrics.hard_rank(eig) <= metrics.soft_rank(eig) <= eig.size
    assert metrics.renyi_rank(eig, 2.0) == pytest.approx(metrics.hard_rank(eig))
    assert metrics.renyi_rank(eig, math.inf) == pytest.approx(1 / (5 / 8.5))
