"""The golden run: pinned losses, points and β of a tiny deterministic sweep (tests/golden/)."""

import dataclasses
import json

import pytest

from contract import metrics as spectra
from spectraldb import fits
from spectraldb.store import write as store_write
from tests.golden.make import PINNED, compute, differences


def test_the_golden_run_matches_its_pinned_numbers():
    """If this fails after a change meant to move the numbers, regenerate deliberately:
    python -m tests.golden.make --write (and say why in the commit)."""
    diff = differences(compute(), json.loads(PINNED.read_text()))
    assert not diff, "\n".join(diff[:20])


def perturbed_metric(monkeypatch):
    hard = spectra.hard_rank
    monkeypatch.setattr(spectra, "hard_rank", lambda eig: hard(eig) * (1 + 1e-4))


def perturbed_aggregation(monkeypatch):
    monkeypatch.setattr(store_write, "RUN_POINTS_SQL", store_write.RUN_POINTS_SQL.replace("median(k.", "max(k."))


def perturbed_fit(monkeypatch):
    law = fits.power_law

    def shifted(x, y):
        return dataclasses.replace(law(x, y), beta=law(x, y).beta + 1e-4)

    monkeypatch.setattr(fits, "power_law", shifted)


@pytest.mark.slow
@pytest.mark.parametrize("perturb, section", [(perturbed_metric, "points"), (perturbed_aggregation, "points"),
                                              (perturbed_fit, "beta")])
def test_the_golden_run_notices_a_perturbed_metric_aggregation_or_fit(monkeypatch, perturb, section):
    perturb(monkeypatch)
    diff = differences(compute(), json.loads(PINNED.read_text()))
    assert any(d.startswith(f"{section}[") for d in diff), diff[:5]
