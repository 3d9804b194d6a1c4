"""Plan and execute a sweep: skip finished run_ids, run the rest (Ray or inline), store each.

Workers receive a plain config dict and the prepared dataset and return plain results; the
driver (this module) is the only writer of the store and commits one run per transaction,
as soon as that run finishes. Ray and the worker code are imported lazily, so planning
and querying need neither torch nor ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from spectraldb import store
from spectraldb.errors import SpecError
from spectraldb.limits import check_cluster, estimate_memory, preflight
from spectraldb.progress import PlainReporter, SidecarReporter, Throttle
from spectraldb.provenance import provenance
from spectraldb.spec import Plan, RunSpec
from spectraldb.writer import Spool, WriterLock, check_store_folder, drain, one_line
from workers.records import RunResult

COMPLETE = ("done", "diverged")


class RayStartError(RuntimeError):
    """Ray could not be started or reached: a runtime fault (exit 1), nothing was trained."""


def plan_rows(plan: Plan, db: str | Path) -> list[dict]:
    """Every run of the plan with its status in the store: new, done, diverged, failed, or spooled
    (finished, its verified result waiting in the spool to be committed)."""
    known = store.statuses(db)
    spooled = Spool(db).run_ids()
    return [{"run_id": r.run_id, "optimizer": r.label, "ffn_mult": r.model.ffn_mult,
             "ffn_width": r.model.ffn_width, "seed": r.train.seed, "steps": r.train.steps,
             "est_mem_gib": round(estimate_memory(r) / 2**30, 3),
             "status": "spooled" if r.run_id in spooled else known.get(r.run_id, "new")} for r in plan.runs]


def todo(plan: Plan, db: str | Path, retry_failed: bool = False) -> list[RunSpec]:
    store.migrate(db)  # an older store is upgraded by the next `specdb run`
    known = store.statuses(db)
    spooled = Spool(db).run_ids()  # finished, waiting for a commit: never trained again
    skip = COMPLETE if retry_failed else COMPLETE + ("failed",)
    return [r for r in plan.runs if known.get(r.run_id) not in skip and r.run_id not in spooled]


def before_training(runs: list[RunSpec], db, executor: str, address: str | None, cache_dir=None) -> dict:
    """Every check `specdb run` makes before anything trains, in its order; `specdb plan` makes the
    same ones (one line, exit 2 each). Returns the prepared datasets."""
    check_store_folder(db)
    if not runs:
        return {}
    preflight(runs, executor, address)
    return prepare_data(runs, cache_dir)


def check_plan(plan: Plan, db, executor: str = "ray", address: str | None = None, cache_dir=None) -> None:
    """`plan`'s share of `run`'s checks: on the runs `run` would train now."""
    if executor not in ("ray", "inline"):
        raise SpecError(f"--executor: unknown executor {executor!r} (expected ray or inline)")
    check_store_folder(db)
    new = {row["run_id"] for row in plan_rows(plan, db) if row["status"] == "new"}
    before_training([r for r in plan.runs if r.run_id in new], db, executor, address, cache_dir)


@dataclass
class SweepResult:
    total: int
    skipped: int
    statuses: dict[str, str] = field(default_factory=dict)
    recovered: int = 0                                  # spooled results committed before training
    waiting: list[str] = field(default_factory=list)    # results still spooled at the end
    damaged: list[str] = field(default_factory=list)    # spool entries moved aside (their runs retrained)

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
        if ds.train.size < r.data.context + 2:
            raise SpecError(f"data.context: the training split of {r.data.corpus} holds {ds.train.size} tokens, "
                            f"fewer than one window of {r.data.context} + 2; use a larger corpus or a smaller context")
        need = (r.measure.tokens // r.data.context) * r.data.context
        if r.measure.source == "heldout" and need > ds.heldout.size:
            raise SpecError(f"measure.tokens: {r.measure.tokens} exceeds the {ds.heldout.size} held-out "
                            "tokens of the corpus; lower it or raise data.heldout_fraction")
    return out


def _data_key(r: RunSpec) -> str:
    return json.dumps(r.data.model_dump(), sort_keys=True)


COMMIT_WAIT_S = 5.0      # during a sweep: wait this long for a reader, then spool and go on
def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value == value and 0 <= value < float("inf") else default


FINAL_WAIT_S = _env_seconds("SPECDB_SPOOL_WAIT", 300.0)  # at the end: keep trying this long


def run_sweep(plan: Plan, db: str | Path, *, executor: str = "ray", address: str | None = None,
              retry_failed: bool = False, reporter: PlainReporter | None = None,
              cache_dir=None, max_in_flight: int | None = None) -> SweepResult:
    if executor not in ("ray", "inline"):
        raise SpecError(f"--executor: unknown executor {executor!r} (expected ray or inline)")
    check_store_folder(db)
    with WriterLock(db):
        spool = Spool(db)
        damaged: list[str] = []
        recovered, _ = drain(spool, db, store.LOCK_WAIT_S, damaged) if spool.pending() else (0, [])
        runs = todo(plan, db, retry_failed)
        result = SweepResult(total=len(plan.runs), skipped=len(plan.runs) - len(runs), recovered=recovered,
                             damaged=damaged)
        if not runs:
            return result
        datasets = before_training(runs, db, executor, address, cache_dir)
        reporter = SidecarReporter(reporter or PlainReporter(), db)
        prov = provenance()
        reporter.start(len(runs), result.skipped)
        sink = _Sink(plan, db, prov, reporter, result, spool)
        try:
            if executor == "inline":
                _run_inline(runs, datasets, sink)
            else:
                _run_ray(runs, datasets, sink, address, max_in_flight)
            result.waiting = sink.finish()
        except BaseException:
            sink.spool_memory()  # interrupted: what is only in memory goes to the spool if it can
            raise
        finally:
            reporter.close()
    return result


def checkpoint_path(run: RunSpec) -> str | None:
    return str(Path(run.checkpoint.dir) / f"{run.run_id}.pt") if run.checkpoint else None


class _Sink:
    """Where finished runs go: the store if it can be written within COMMIT_WAIT_S, else the
    spool (durably), else, if even the spool cannot be written, memory until the sweep ends."""

    def __init__(self, plan, db, prov, reporter, result, spool: Spool):
        self.plan, self.db, self.prov, self.reporter, self.result, self.spool = plan, db, prov, reporter, result, spool
        self.unspooled: list[tuple[RunSpec, dict]] = []

    def put(self, run: RunSpec, res: RunResult) -> None:
        note = ""
        try:
            status = store.write_run(self.db, run, res, self.prov, self.plan.spec_name, wait_s=COMMIT_WAIT_S)
            if status != res["status"]:
                note = f" (the store already holds it as {status}; kept)"
        except Exception as exc:  # noqa: BLE001 - any commit error: keep the result, go on
            note = f" — not committed yet ({one_line(exc)}); {self._keep(run, res)}"
        else:
            self.retry(COMMIT_WAIT_S)
        ckpt = checkpoint_path(run)
        if ckpt and res["status"] != "failed" and not run.checkpoint.keep:
            Path(ckpt).unlink(missing_ok=True)  # stored or spooled: the checkpoint has done its job
        self.result.statuses[run.run_id] = res["status"]
        detail = ""
        if res["evals"]:
            detail = f" val_ppl={res['evals'][-1]['val_ppl']:.1f}"
        if res.get("error"):
            detail += f" — {res['error'].strip().splitlines()[-1]}"
        self.reporter.finish(run.run_id, _describe(run), res["status"], res["finished_at"] - res["started_at"],
                             detail + note)

    def _keep(self, run: RunSpec, res: dict) -> str:
        try:
            path = self.spool.put(run.run_id, run.config(), res, self.prov, self.plan.spec_name)
            return f"kept in {path}"
        except OSError as exc:
            self.unspooled.append((run, res))
            return f"the spool cannot be written either ({one_line(exc)}); held in memory"

    def retry(self, wait_s: float) -> list[str]:
        """Commit what waits (memory first, then the spool); returns what still waits."""
        still = []
        for run, res in self.unspooled:
            try:
                store.write_run(self.db, run, res, self.prov, self.plan.spec_name, wait_s=wait_s)
            except Exception as exc:  # noqa: BLE001
                still.append((run, res, exc))
        self.unspooled = [(r, x) for r, x, _ in still]
        _, waiting = drain(self.spool, self.db, wait_s) if self.spool.pending() else (0, [])
        return [f"{r.run_id}: {one_line(e)} (in memory only)" for r, _, e in still] + waiting

    def spool_memory(self) -> None:
        for run, res in self.unspooled:
            with contextlib.suppress(OSError):
                self.spool.put(run.run_id, run.config(), res, self.prov, self.plan.spec_name)

    def finish(self) -> list[str]:
        """At the end of the sweep keep trying for FINAL_WAIT_S (a long reader only delays us)."""
        deadline = time.monotonic() + FINAL_WAIT_S
        waiting, told = self.retry(COMMIT_WAIT_S), (None, 0.0)
        while waiting and time.monotonic() < deadline:
            if (len(waiting), waiting[0]) != told[0] or time.monotonic() - told[1] > 30:
                self.reporter.note(f"{len(waiting)} finished run(s) waiting to be committed: {waiting[0]}")
                told = ((len(waiting), waiting[0]), time.monotonic())
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))  # a full disk answers at once
            waiting = self.retry(min(30.0, max(0.1, deadline - time.monotonic())))
        return waiting


def _describe(run: RunSpec) -> str:
    """The progress line's name for a run: optimizer label, width and seed."""
    return f"{run.label} ffn_mult={run.model.ffn_mult:g} seed={run.train.seed}"


def _run_inline(runs, datasets, sink) -> None:
    from workers.train import run as train_run

    reporter = sink.reporter
    for r in runs:
        ds = datasets[_data_key(r)]
        throttle = Throttle()

        def progress(step, steps, r=r):
            if throttle.ready(step, steps):
                reporter.step(r.run_id, r.label, step, steps)

        res = train_run(r.config(), ds, progress, checkpoint=checkpoint_path(r))
        res["vocab_size"] = ds.vocab_size
        sink.put(r, res)


def _run_ray(runs, datasets, sink, address, max_in_flight=None) -> None:
    import logging

    import ray

    reporter = sink.reporter
    started_here = not ray.is_initialized()
    # Ray announces token authentication on every start; it is advice, not a problem of the sweep
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if started_here:
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:  # "local": always a fresh instance, even when another Ray runs on this machine
                ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray's start-up errors come in many types
            raise RayStartError(f"--address: cannot start or reach Ray ({one_line(exc)})") from None
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        check_cluster(runs, ray.nodes())

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
                sink.put(r, res)
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
