"""`specdb plan` and `specdb status SPEC` count every status of the one vocabulary, spooled included."""

import json

from typer.testing import CliRunner

from cli.main import app
from contract.vocabulary import PLAN_STATUSES
from spectraldb.sidecar.spool import Spool
from spectraldb.spec import load_spec
from tests.builders import result
from tests.conftest import tiny_spec

runner = CliRunner()


def test_plan_and_status_count_spooled_runs_in_their_totals(tmp_path, corpus):
    db, spec = tmp_path / "s.duckdb", tmp_path / "s.yaml"
    spec.write_text(tiny_spec(corpus, db, "sweep:\n  seed: [0, 1, 2]\n"))
    first = load_spec(spec)[0].runs[0]
    Spool(db).put(first.run_id, first.config(), result("done"), {}, "tiny", 300)

    plan = runner.invoke(app, ["plan", str(spec), "--format", "json", "--executor", "inline"])
    assert plan.exit_code == 0, plan.output
    assert [r["status"] for r in json.loads(plan.stdout)] == ["spooled", "new", "new"]
    assert "3 runs: 2 new, 1 spooled, 0 done, 0 diverged, 0 failed" in plan.stderr

    status = runner.invoke(app, ["status", str(spec), "--format", "json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout) == [{"status": "new", "runs": 2}, {"status": "spooled", "runs": 1}]
    assert "3 runs: 2 new, 1 spooled, 0 done, 0 diverged, 0 failed" in status.stderr


def test_the_totals_name_every_status_in_the_vocabulary():
    assert PLAN_STATUSES == ("new", "spooled", "done", "diverged", "failed")
