"""`specdb measure` on Ray: one task per checkpoint, as many at once as the resources allow, a
task whose process dies retried, each checkpoint stored once."""

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.test_checkpoints import rows_of, save_checkpoint, spec_text

pytestmark = pytest.mark.slow  # builds, saves and loads HF models on a Ray instance
runner = CliRunner()


def dying_once(markers, victim: str):
    """workers.checkpoints.measure_entry, except that the first attempt at `victim` kills its own
    worker process halfway (after loading, before returning); every call leaves a start/end mark."""

    def measure(kw, threads=None):
        import os
        import time

        from workers.checkpoints import measure_entry

        name = os.path.basename(kw["path"])
        (markers / f"start-{name}-{time.time():.6f}").touch()
        if name == victim and not (markers / "killed").exists():
            (markers / "killed").touch()
            time.sleep(0.5)
            os._exit(1)
        out = measure_entry(kw, threads)
        (markers / f"end-{name}-{time.time():.6f}").touch()
        return out

    return measure


def test_a_suite_runs_as_ray_tasks_two_at_once_and_a_killed_task_is_retried(tmp_path, corpus, monkeypatch):
    import sys

    from ray import cloudpickle

    from spectraldb.run import executors

    markers = tmp_path / "markers"
    markers.mkdir()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(executors, "MEASURE", dying_once(markers, "c3"))
    store, spec = tmp_path / "suite.duckdb", tmp_path / "suite.yaml"
    entries = [{"path": str(save_checkpoint(tmp_path / f"c{i}", corpus, 32, seed=i)), "optimizer": "AdamW",
                "step": 100 * (i + 1)} for i in range(6)]
    spec.write_text(spec_text(store, corpus, entries) + "resources: {cpus: 1, max_retries: 2}\n")
    result = runner.invoke(app, ["measure", str(spec)])
    assert result.exit_code == 0, result.output
    assert "stored 6 checkpoints" in result.stderr and "6 done" in result.stderr
    assert [f"[{i}/6]" in result.stderr for i in range(1, 7)] == [True] * 6  # progress: done/total
    starts = sorted(p.name for p in markers.glob("start-*"))
    assert len(starts) == 7 and sum(s.startswith("start-c3-") for s in starts) == 2  # c3 ran twice: killed, retried
    spans = {}
    for p in markers.iterdir():
        kind, _, rest = p.name.partition("-")
        if kind in ("start", "end"):
            name, when = rest.rsplit("-", 1)
            spans.setdefault(name, {})[kind] = float(when)  # c3: the later (retried) start
    spans = sorted((v["start"], v["end"]) for v in spans.values())
    assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans  # two at once
    runs = rows_of(store, "SELECT steps, status, device || '/' || forward_dtype FROM runs ORDER BY steps")
    per_run = rows_of(store, "SELECT count(*) FROM spectra GROUP BY run_id")
    assert runs == [(100 * (i + 1), "done", "cpu/float32") for i in range(6)]  # each once
    assert len(per_run) == 6 and len({n for n, in per_run}) == 1
