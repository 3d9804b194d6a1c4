"""Plan and execute a sweep: skip finished run_ids, run the rest (Ray or inline), store each.

Workers receive a plain config dict and the prepared dataset and return plain results; the
driver (this module) is the only writer of the store and commits one run per transaction,
as soon as that run finishes. Ray and the worker code are imported lazily, so planning
and querying need neither torch nor ray.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from spectraldb import store
from spectraldb.errors import SpecError
from spectraldb.progress import PlainReporter, SidecarReporter, Throttle
from spectraldb.provenance import provenance
from spectraldb.spec import Plan, RunSpec

COMPLETE = ("done", "diverged")


def plan_rows(plan: Plan, db: str | Path) -> list[dict]:
    """Every run of the plan with its status in the store: new, done, diverged or failed."""
    known = store.statuses(db)
    return [{"run_id": r.run_id, "optimizer": r.label, "ffn_mult": r.model.ffn_mult,
             "ffn_width": r.model.ffn_width, "seed": r.train.seed, "steps": r.train.steps,
             "status": known.get(r.run_id, "new")} for r in plan.runs]


def todo(plan: Plan, db: str | Path, retry_failed: bool = False) -> list[RunSpec]:
    store.migrate(db)  # an older store is upgraded by the next `specdb run`
    known = store.statuses(db)
    skip = COMPLETE if retry_failed else COMPLETE + ("failed",)
    return [r for r in plan.runs if known.get(r.run_id) not in skip]


@dataclass
class SweepResult:
    total: int
    skipped: int
    statuses: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s == "done" for s in self.statuses.values())


def prepare_data(runs: list[RunSpec], cache_dir=None) -> dict[str, object]:
    """One dataset per distinct `data:` section; bad corpora fail here, before anything runs."""
    from workers.data import DataError, prepare

    out = {}
    for r in runs:
        key = json.dumps(r.data.model_dump(), sort_keys=True)
        if key not in out:
            try:
                out[key] = prepare(r.data.model_dump(), cache_dir)
            except DataError as exc:
                raise SpecError(f"data.corpus: {exc}") from None
        ds = out[key]
        need = (r.measure.tokens // r.data.context) * r.data.context
        if r.measure.source == "heldout" and need > ds.heldout.size:
            raise SpecError(f"measure.tokens: {r.measure.tokens} exceeds the {ds.heldout.size} held-out "
                            "tokens of the corpus; lower it or raise data.heldout_fraction")
    return out


def _data_key(r: RunSpec) -> str:
    return json.dumps(r.data.model_dump(), sort_keys=True)


def run_sweep(plan: Plan, db: str | Path, *, executor: str = "ray", address: str | None = None,
              retry_failed: bool = False, reporter: PlainReporter | None = None,
              cache_dir=None, max_in_flight: int | None = None) -> SweepResult:
    runs = todo(plan, db, retry_failed)
    result = SweepResult(total=len(plan.runs), skipped=len(plan.runs) - len(runs))
    if not runs:
        return result
    reporter = SidecarReporter(reporter or PlainReporter(), db)
    datasets = prepare_data(runs, cache_dir)
    prov = provenance()
    reporter.start(len(runs), result.skipped)
    try:
        if executor == "inline":
            _run_inline(plan, runs, datasets, db, prov, reporter, result)
        elif executor == "ray":
            _run_ray(plan, runs, datasets, db, prov, reporter, result, address, max_in_flight)
        else:
            raise SpecError(f"--executor: unknown executor {executor!r} (expected ray or inline)")
    finally:
        reporter.close()
    return result


def checkpoint_path(run: RunSpec) -> str | None:
    return str(Path(run.checkpoint.dir) / f"{run.run_id}.pt") if run.checkpoint else None


def _store(plan, run, res, db, prov, reporter, result) -> None:
    store.write_run(db, run, res, prov, plan.spec_name)
    ckpt = checkpoint_path(run)
    if ckpt and res["status"] != "failed" and not run.checkpoint.keep:
        Path(ckpt).unlink(missing_ok=True)  # stored: the checkpoint has done its job
    result.statuses[run.run_id] = res["status"]
    detail = ""
    if res["evals"]:
        ppl = res["evals"][-1]["val_ppl"]
        detail = f" val_ppl={ppl:.1f}"
    if res.get("error"):
        detail += f" — {res['error'].strip().splitlines()[-1]}"
    reporter.finish(run.run_id, run.label, res["status"], res["finished_at"] - res["started_at"], detail)


def _run_inline(plan, runs, datasets, db, prov, reporter, result) -> None:
    from workers.train import run as train_run

    for r in runs:
        ds = datasets[_data_key(r)]
        throttle = Throttle()

        def progress(step, steps, r=r):
            if throttle.ready(step, steps):
                reporter.step(r.run_id, r.label, step, steps)

        res = train_run(r.config(), ds, progress, checkpoint=checkpoint_path(r))
        res["vocab_size"] = ds.vocab_size
        _store(plan, r, res, db, prov, reporter, result)


def _run_ray(plan, runs, datasets, db, prov, reporter, result, address, max_in_flight=None) -> None:
    import logging

    import ray

    started_here = not ray.is_initialized()
    if started_here:
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count(), **kwargs)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # the progress board lives beside the driver, so losing a worker node never takes it along
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        board = _Board.options(num_cpus=0, scheduling_strategy=here).remote()
        data_refs = {k: ray.put(ds) for k, ds in datasets.items()}  # shipped once, shared by runs
        pending = {}
        queue = list(runs)
        cap = max_in_flight or len(runs)  # Ray queues the rest by resources; a cap bounds the driver

        def submit():
            while queue and len(pending) < cap:
                r = queue.pop(0)
                task = _ray_task.options(num_cpus=r.resources.cpus, num_gpus=r.resources.gpus,
                                         max_retries=r.resources.max_retries)
                ref = task.remote(r.config(), data_refs[_data_key(r)], board, r.run_id, max(1, int(r.resources.cpus)),
                                  datasets[_data_key(r)].vocab_size, checkpoint_path(r))
                pending[ref] = r

        submit()
        labels = {r.run_id: r.label for r in runs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            try:
                snapshot = ray.get(board.snapshot.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress is best effort; results are what matter
                snapshot = {}
            for run_id, (step, steps) in snapshot.items():
                if run_id in labels:
                    reporter.step(run_id, labels[run_id], step, steps)
            for ref in ready:
                r = pending.pop(ref)
                labels.pop(r.run_id, None)
                try:
                    res = ray.get(ref)
                except Exception as exc:  # the worker process died: record, go on
                    now = time.time()
                    res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "evals": [],
                           "spectra": [], "started_at": now, "finished_at": now}
                _store(plan, r, res, db, prov, reporter, result)
            submit()
    finally:
        if started_here:
            ray.shutdown()


class _LazyRemote:
    """Defers ray.remote until first use so that importing this module needs no ray."""

    def __init__(self, factory):
        self.factory, self.obj = factory, None

    def __getattr__(self, name):
        if self.obj is None:
            self.obj = self.factory()
        return getattr(self.obj, name)


def _make_board():
    import ray

    @ray.remote
    class Board:
        def __init__(self):
            self.steps = {}

        def report(self, run_id, step, steps):
            self.steps[run_id] = (step, steps)

        def snapshot(self):
            return dict(self.steps)

    return Board


def _make_task():
    import ray

    @ray.remote(max_retries=2)
    def task(config, ds, board, run_id, threads, vocab, checkpoint):
        from workers.train import run as train_run

        throttle = Throttle(1.0)
        kill_at = _fault_injection(run_id)

        def progress(step, steps):
            if kill_at is not None and step == kill_at:
                os._exit(1)  # simulate a worker process dying mid-run (fault tests only)
            if throttle.ready(step, steps):
                board.report.remote(run_id, step, steps)

        res = train_run(config, ds, progress, threads, checkpoint=checkpoint)
        res["vocab_size"] = vocab
        return res

    return task


def _fault_injection(run_id: str) -> int | None:
    """SPECDB_FAULT_KILL_AT="STEP:DIR" makes each run's first attempt kill its own worker process
    at STEP (a marker file in DIR remembers the attempt). For the fault-tolerance tests."""
    spec = os.environ.get("SPECDB_FAULT_KILL_AT")
    if not spec:
        return None
    step, folder = spec.split(":", 1)
    marker = Path(folder) / f"killed-{run_id}"
    if marker.exists():
        return None
    marker.touch()
    return int(step)


_Board = _LazyRemote(_make_board)
_ray_task = _LazyRemote(_make_task)
