"""Data-parallel runs on Ray Train (gloo on CPUs): one run across two ranks, a rank killed mid-run,
one- and two-worker runs sharing two CPUs, and the spec errors that must stop a sweep first."""

import hashlib
import json
import os
import sys
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from spectraldb.run import executors
from tests.conftest import rows, tiny_spec

runner = CliRunner()

def parallel_spec(tmp_path, corpus, name, *, workers=2, extra="", sweep="", lr="3e-3", steps=6):
    """8 sequences of 16 tokens: two ranks hold 4 each (64 tokens); the strata take rank 0's
    share, `all` both ranks'."""
    spec = tmp_path / f"{name}.yaml"
    text = tiny_spec(corpus, tmp_path / f"{name}.duckdb", sweep, steps=steps, extra=extra).replace(
        "batch_size: 4", "batch_size: 8").replace(
        "tokens: 1024", "tokens: 64, all_tokens: 128, source: train_batch").replace("every: 3", "every: 2")
    text += f"optimizer: {{name: adamw, lr: {lr}, weight_decay: 0}}\nresources: {{workers: {workers}, cpus: 1}}\n"
    spec.write_text(text)
    return spec, tmp_path / f"{name}.duckdb"



@pytest.mark.slow
def test_two_ranks_commit_one_run_equal_to_one_process(tmp_path, corpus):
    """lr 1e-30 leaves the weights bitwise where the seed put them (an update below float32's
    resolution), so both runs measure the same weights on the same tokens: the stored spectra
    agree to 1e-9 relative and only the reduction across ranks stands between them. `all` holds
    both ranks' 128 tokens, the strata rank 0's 64, and the run records 2 workers and `study`."""
    two, db2 = parallel_spec(tmp_path, corpus, "two", lr="1e-30")
    one, db1 = parallel_spec(tmp_path, corpus, "one", workers=1, lr="1e-30")
    result = runner.invoke(app, ["run", str(two)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["run", str(one), "--executor", "inline"]).exit_code == 0
    assert rows(db2, "SELECT status, workers, reduction, protocol FROM runs") == [("done", 2, "study", 3)]
    counts = rows(db2, "SELECT step, layer, site, stratum, n_tokens FROM spectra ORDER BY ALL")
    assert {n for *_, stratum, n in counts if stratum == "all"} == {128}
    per_site = {}
    for step, layer, site, stratum, n in counts:
        if stratum != "all":
            per_site[(step, layer, site)] = per_site.get((step, layer, site), 0) + n
    assert set(per_site.values()) == {64}
    sql = "SELECT step, layer, site, stratum, n_tokens, eigenvalues FROM spectra ORDER BY ALL"
    got, expect = rows(db2, sql), rows(db1, sql)
    assert [g[:5] for g in got] == [e[:5] for e in expect] and len(got) == 4 * 2 * 2 * 4
    for g, e in zip(got, expect):
        if e[5] is not None:
            assert np.allclose(g[5], e[5], rtol=1e-9, atol=1e-12 * max(e[5]))
    losses = "SELECT step, train_loss, val_loss FROM evals ORDER BY step"
    for g, e in zip(rows(db2, losses), rows(db1, losses)):
        assert g[0] == e[0] and g[1:] == pytest.approx(e[1:], rel=1e-6)


def dying_rank(markers, step):
    """Rank 1's first attempt of each run kills its process at `step`; every attempt notes whether
    it found a checkpoint to resume from."""

    def train(config, ds, progress=None, threads=None, checkpoint=None, distributed=False):
        import torch.distributed as dist
        from workers.train import run

        key = hashlib.sha1(repr(config).encode()).hexdigest()[:12]
        rank = dist.get_rank()
        first = not (markers / f"killed-{key}").exists()
        if rank == 0:
            with open(markers / f"attempts-{key}", "a") as f:
                f.write("resumed\n" if os.path.exists(checkpoint) else "fresh\n")

        def report(done, steps):
            if first and rank == 1 and done == step:
                (markers / f"killed-{key}").touch()
                os._exit(1)
            if progress is not None:
                progress(done, steps)

        return run(config, ds, report, threads, checkpoint=checkpoint, distributed=distributed)

    return train


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_retried_resumes_and_is_stored_once(tmp_path, corpus, monkeypatch):
    from ray import cloudpickle

    markers = tmp_path / "markers"
    markers.mkdir()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(executors, "TRAIN", dying_rank(markers, 5))
    spec, db = parallel_spec(tmp_path, corpus, "k", steps=8,
                             extra=f"checkpoint: {{every: 2, dir: {tmp_path / 'ckpt'}}}\n")
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output
    attempts = [p.read_text().split() for p in markers.glob("attempts-*")]
    assert attempts == [["fresh", "resumed"]]
    assert rows(db, "SELECT status, workers FROM runs") == [("done", 2)]
    assert rows(db, "SELECT count(*), count(DISTINCT step) FROM evals") == [(5, 5)]  # 1, 2, 4, 6, 8: once each
    assert rows(db, "SELECT count(*) FROM spectra") == [(5 * 2 * 2 * 4,)]
    assert not list((tmp_path / "ckpt").glob("*"))  # nothing half-written, the checkpoint gone once stored
    plan = runner.invoke(app, ["plan", str(spec), "--format", "json"])
    assert [r["status"] for r in json.loads(plan.stdout)] == ["done"]


@pytest.mark.slow
def test_one_and_two_worker_runs_share_two_cpus_without_deadlock(tmp_path, corpus):
    """Two-worker runs need both CPUs at once; one-worker runs take one each. On a 2-CPU Ray the
    sweep finishes: a waiting two-worker run holds nothing, and Ray Train places all or none."""
    import ray

    sweep = "sweep:\n  zip:\n    - resources.workers: [2, 1, 1, 2]\n      train.seed: [0, 1, 2, 3]\n"
    spec, db = parallel_spec(tmp_path, corpus, "mix", sweep=sweep, steps=4)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    box = {}
    try:
        worker = threading.Thread(target=lambda: box.update(result=runner.invoke(app, ["run", str(spec)])),
                                  daemon=True)
        worker.start()
        worker.join(300)
        assert not worker.is_alive(), "the sweep did not finish in 300 s (deadlock)"
    finally:
        ray.shutdown()
    assert box["result"].exit_code == 0, box["result"].output
    assert sorted(rows(db, "SELECT workers, status FROM runs")) == [(1, "done"), (1, "done"), (2, "done"), (2, "done")]


@pytest.mark.parametrize("change, field", [
    ("resources: {workers: 4096, cpus: 1}", "resources.workers"),        # more than the cluster can ever hold
    ("resources: {workers: 3, cpus: 1}", "train.batch_size"),            # 8 sequences over 3 ranks
    ("measure: {reduction: globl}", "measure.reduction"),
    ("measure: {tokens: 128, source: train_batch}", "measure.tokens"),   # past rank 0's 64 under `study`
    ("measure: {tokens: 128, all_tokens: 64}", "measure.all_tokens"),
    ("resources: {workers: 0, cpus: 1}", "resources.workers"),
    ("resources: {workers: .nan, cpus: 1}", "resources.workers"),
    ("resources: {workers: 1.5, cpus: 1}", "resources.workers"),
    ("resources: {workers: 2, cpus: 1, collective_timeout_s: 0}", "resources.collective_timeout_s"),
    ("measure: {all_tokens: .inf}", "measure.all_tokens"),
    ("measure: {all_tokens: 99999999999999}", "measure.all_tokens"),
    ("measure: {reduction: ''}", "measure.reduction"),
    ("measure: {reduction: [study]}", "measure.reduction"),
])
def test_bad_parallel_specs_stop_before_anything_trains(tmp_path, corpus, change, field):
    spec = tmp_path / "bad.yaml"
    db = tmp_path / "bad.duckdb"
    base = tiny_spec(corpus, db, "").replace("batch_size: 4", "batch_size: 8")
    section = change.split(":")[0]
    lines = [ln for ln in base.splitlines() if not ln.startswith(section + ":")]
    if section == "measure":  # keep the rest of the measure section
        kept = "every: 3, last_k: 2, min_stratum_tokens: 20"
        change = change.replace("{", "{" + kept + ", ", 1)
    if section != "resources":
        lines.append("resources: {workers: 2, cpus: 1}")
    spec.write_text("\n".join(lines + [change]) + "\n")
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not db.exists()


def test_a_cluster_that_can_never_hold_every_worker_is_refused():
    """Against a Ray cluster's nodes: 3 one-CPU workers fit two 2-CPU nodes, 5 do not; GPU workers
    count the GPUs; a node that is not alive holds nothing."""
    from spectraldb.errors import SpecError
    from spectraldb.run.preflight import check_cluster
    from spectraldb.spec import RunSpec

    def run(**resources):
        return RunSpec.model_validate({"resources": resources, "train": {"batch_size": 60}})

    nodes = [{"Resources": {"CPU": 2.0}}, {"Resources": {"CPU": 2.0, "GPU": 1.0}},
             {"Resources": {"CPU": 64.0, "GPU": 8.0}, "Alive": False}]
    check_cluster([run(workers=3, cpus=1), run(workers=4, cpus=1)], nodes)
    for bad in (run(workers=5, cpus=1), run(workers=2, cpus=1, gpus=1), run(workers=3, cpus=2)):
        with pytest.raises(SpecError, match="resources.workers"):
            check_cluster([bad], nodes)


def test_workers_need_the_ray_executor(tmp_path, corpus):
    spec, db = parallel_spec(tmp_path, corpus, "inline")
    result = runner.invoke(app, ["run", str(spec), "--executor", "inline"])
    assert result.exit_code == 2 and "resources.workers" in result.stderr and "--executor ray" in result.stderr
    assert not db.exists()


@pytest.mark.slow
def test_the_data_parallel_benchmark_runs_and_meets_its_goal(tmp_path):
    """The GPU command's CPU form (gloo, 2 ranks): it prints the losses, the spectra's agreement
    on the same weights and tokens (≤ 1e-9), the wall ratio, the measurement share and the
    reduction time."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SPECDB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "benchmarks/data_parallel.py", "--quick"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    gap = float(re.search(r"same weights, same tokens \(lr 1e-30\): largest relative eigenvalue difference (\S+)",
                          out.stdout).group(1))
    loss = float(re.search(r"largest relative loss difference: (\S+)", out.stdout).group(1))
    assert gap <= 1e-9 and loss <= 1e-5
    assert re.search(r"wall: 2 ranks [\d.]+ s, 1 process [\d.]+ s, ratio [\d.]+", out.stdout)
    assert re.search(r"rank 0: measuring [\d.]+ s \([\d.]+% of its wall\), of which in the reduction across "
                     r"ranks \(gloo, waiting for the slower rank included\) [\d.]+ ms", out.stdout)
