"""A run restarted after a crash resumes from its checkpoint and ends bitwise-identical."""

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb.spec import load_spec
from tests.conftest import tiny_spec
from workers.data import prepare
from workers.train import run as train_run

runner = CliRunner()


class Crash(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "{name: dion, rank_fraction: 0.5}"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, corpus, optimizer):
    spec = tmp_path / "c.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "c.duckdb", "", steps=9,
                              extra=f"optimizer: {optimizer}\ncheckpoint: {{every: 4, dir: {tmp_path / 'ck'}}}\n"))
    run = load_spec(spec)[0].runs[0]
    ds = prepare(run.worker_config().data)
    clean = train_run(run.worker_config(), ds)

    def crash_at_7(step, steps):
        if step == 7:
            raise Crash("simulated crash")

    ckpt = tmp_path / "ck" / f"{run.run_id}.pt"
    crashed = train_run(run.worker_config(), ds, crash_at_7, checkpoint=ckpt)
    assert crashed.status == "failed" and ckpt.exists()
    resumed = train_run(run.worker_config(), ds, checkpoint=ckpt)
    assert resumed.status == "done" and resumed.resumed_from == 4
    assert resumed.evals == clean.evals
    assert len(resumed.spectra) == len(clean.spectra)
    for a, b in zip(resumed.spectra, clean.spectra):
        assert (a.step, a.layer, a.site, a.stratum) == (b.step, b.layer, b.site, b.stratum)
        if a.eigenvalues is not None:
            assert np.array_equal(a.eigenvalues, b.eigenvalues)
        assert a.metrics == b.metrics and a.reinjection == b.reinjection


def test_checkpoint_is_removed_once_stored_and_does_not_change_run_ids(tmp_path, corpus):
    base = tiny_spec(corpus, tmp_path / "c.duckdb", "", steps=6)
    with_ckpt = base + f"checkpoint: {{every: 2, dir: {tmp_path / 'ck'}}}\n"
    (tmp_path / "a.yaml").write_text(base)
    (tmp_path / "b.yaml").write_text(with_ckpt)
    assert load_spec(tmp_path / "a.yaml")[0].runs[0].run_id == load_spec(tmp_path / "b.yaml")[0].runs[0].run_id
    result = runner.invoke(app, ["run", str(tmp_path / "b.yaml"), "--executor", "inline"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ck").exists() and not list((tmp_path / "ck").iterdir())
