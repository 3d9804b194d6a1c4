"""Plan and execute a sweep: skip finished run_ids, run the rest (spectraldb.run.executors), store
each as soon as it finishes (spectraldb.run.sink). The driver is the only writer of the store
and commits one run per transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contract.vocabulary import FINISHED
from spectraldb import store
from spectraldb.errors import SpecError
from spectraldb.provenance import provenance
from spectraldb.reader import stored_statuses
from spectraldb.run import executors
from spectraldb.run.executors import prepare_data
from spectraldb.sidecar.lock import WriterLock
from spectraldb.run.preflight import estimate_memory, measurement_plan, preflight
from spectraldb.sidecar.files import check_store_folder
from spectraldb.run.progress import PlainReporter
from spectraldb.sidecar.progress import SidecarReporter
from spectraldb.run.sink import Sink
from spectraldb.sidecar.spool import Spool, drain
from spectraldb.spec import Plan, RunSpec

EXECUTORS = ("ray", "inline")


def plan_rows(plan: Plan, db: str | Path) -> list[dict]:
    """Every run of the plan with its status in the store: new, done, diverged, failed, or spooled
    (finished, its verified result waiting in the spool to be committed); `est_mem_gib` is per
    worker (rank) of a data-parallel run."""
    known = stored_statuses(db)
    spooled = Spool(db).run_ids()
    return [{"run_id": r.run_id, "optimizer": r.label, "ffn_mult": r.model.ffn_mult,
             "ffn_width": r.model.ffn_width, "seed": r.train.seed, "steps": r.train.steps,
             "workers": r.resources.workers, "est_mem_gib": round(estimate_memory(r) / 2**30, 3),
             "measure_gib": round(measurement_plan(r).peak / 2**30, 3), "passes": measurement_plan(r).n_passes,
             "status": "spooled" if r.run_id in spooled else known.get(r.run_id, "new")} for r in plan.runs]


def todo(plan: Plan, db: str | Path, retry_failed: bool = False) -> list[RunSpec]:
    store.migrate(db)  # an older store is upgraded by the next `specdb run`
    known = stored_statuses(db)
    spooled = Spool(db).run_ids()  # finished, waiting for a commit: never trained again
    skip = FINISHED if retry_failed else FINISHED + ("failed",)
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
    if executor not in EXECUTORS:
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


def run_sweep(plan: Plan, db: str | Path, *, executor: str = "ray", address: str | None = None,
              retry_failed: bool = False, reporter: PlainReporter | None = None,
              cache_dir=None, max_in_flight: int | None = None) -> SweepResult:
    if executor not in EXECUTORS:
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
        sink = Sink(plan, db, prov, reporter, result, spool)
        try:
            if executor == "inline":
                executors.run_inline(runs, datasets, sink)
            else:
                executors.run_ray(runs, datasets, sink, address, max_in_flight)
            result.waiting = sink.finish()
        except BaseException:
            sink.spool_memory()  # interrupted: what is only in memory goes to the spool if it can
            raise
        finally:
            reporter.close()
    return result
