"""Where runs train: in this process (`inline`) or as Ray tasks (`ray`).

With spectraldb.run.parallel (data-parallel runs on Ray Train), the only modules of spectraldb
that import worker code (`workers.data`, `workers.train`) and Ray, both lazily: planning and
querying need neither torch nor ray. Workers receive a plain
config dict and the prepared dataset and return a `contract.records.RunResult` (as a dict across
Ray); the sink (spectraldb.run.sink) stores it, with the dataset's vocabulary size, which the
driver knows.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from contract.records import CheckpointResult, RunResult
from spectraldb.errors import RayStartError, SpecError, one_line
from spectraldb.run import parallel
from spectraldb.run.preflight import check_cluster, check_node_fits
from spectraldb.run.remote import LazyRemote
from spectraldb.sidecar.progress import Throttle

if TYPE_CHECKING:
    from spectraldb.spec import RunSpec

# A replacement for workers.train.run (same signature), shipped to every worker: the tests' way
# to make a worker process die mid-run. None: the real training loop.
TRAIN = None


def prepare_data(runs: list[RunSpec], cache_dir=None) -> dict[str, object]:
    """One dataset per distinct `data:` section; bad corpora fail here, before anything runs."""
    from workers.data import DataError, prepare

    out = {}
    for r in runs:
        key = json.dumps(r.data.model_dump(), sort_keys=True)
        if key not in out:
            try:
                out[key] = prepare(r.worker_config().data, cache_dir)
            except DataError as exc:
                raise SpecError(f"data.corpus: {exc}") from None
        ds = out[key]
        if ds.train.size < r.data.context + 2:
            raise SpecError(f"data.context: the training split of {r.data.corpus} holds {ds.train.size} tokens, "
                            f"fewer than one window of {r.data.context} + 2; use a larger corpus or a smaller context")
        need = (r.measure.pooled_tokens // r.data.context) * r.data.context
        if r.measure.source == "heldout" and need > ds.heldout.size:
            field = "measure.all_tokens" if r.measure.pooled_tokens > r.measure.tokens else "measure.tokens"
            raise SpecError(f"{field}: {r.measure.pooled_tokens} exceeds the {ds.heldout.size} held-out "
                            "tokens of the corpus; lower it or raise data.heldout_fraction")
    return out


def data_key(r: RunSpec) -> str:
    return json.dumps(r.data.model_dump(), sort_keys=True)


def checkpoint_path(run) -> str | None:
    return str(Path(run.checkpoint.dir) / f"{run.run_id}.pt") if run.checkpoint else None


def workers_train_run(*args, **kw):
    from workers.train import run

    return run(*args, **kw)


def run_inline(runs, datasets, sink) -> None:
    """Each run in this process, one after another."""
    train_run = TRAIN or workers_train_run
    reporter = sink.reporter
    for r in runs:
        ds = datasets[data_key(r)]
        throttle = Throttle()

        def progress(step, steps, r=r):
            if throttle.ready(step, steps):
                reporter.step(r.run_id, r.label, step, steps)

        sink.put(r, train_run(r.worker_config(), ds, progress, checkpoint=checkpoint_path(r)), ds.vocab_size)


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray for one command: a fresh local instance (address None) or a cluster, shut down after
    unless it was already running in this process."""
    import logging

    import ray

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
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def run_ray(runs, datasets, sink, address, max_in_flight=None) -> None:
    """Each run as a Ray task (retried when its worker process dies), at most `max_in_flight` at once."""
    reporter = sink.reporter
    with ray_session(address) as ray:
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
                if r.resources.workers > 1:
                    ref = parallel.submit(r, data_refs[data_key(r)], board, checkpoint_path(r), TRAIN)
                else:
                    task = _ray_task.options(num_cpus=r.resources.cpus, num_gpus=r.resources.gpus,
                                             max_retries=r.resources.max_retries)
                    ref = task.remote(r.worker_config(), data_refs[data_key(r)], board, r.run_id,
                                      max(1, int(r.resources.cpus)), checkpoint_path(r), TRAIN)
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
                    res = RunResult.from_dict(ray.get(ref))
                except Exception as exc:  # the worker process died: record, go on
                    res = RunResult.failed(f"{type(exc).__name__}: {exc}")
                sink.put(r, res, datasets[data_key(r)].vocab_size)
            submit()


def _make_board():
    import ray

    @ray.remote
    class Board:
        """Progress of every run, and the results rank 0 of a data-parallel run hands over."""

        def __init__(self):
            self.steps, self.results = {}, {}

        def report(self, run_id, step, steps):
            self.steps[run_id] = (step, steps)

        def snapshot(self):
            return dict(self.steps)

        def deliver(self, run_id, result):  # a retried attempt's result replaces the failed one's
            self.results[run_id] = result

        def collect(self, run_id):
            return self.results.pop(run_id, None)

    return Board


def _make_task():
    import ray

    @ray.remote(max_retries=2)
    def task(config, ds, board, run_id, threads, checkpoint, train):
        from workers.train import run as workers_train_run

        throttle = Throttle(1.0)

        def progress(step, steps):
            if throttle.ready(step, steps):
                board.report.remote(run_id, step, steps)

        return (train or workers_train_run)(config, ds, progress, threads, checkpoint=checkpoint).to_dict()

    return task


_Board = LazyRemote(_make_board)
_ray_task = LazyRemote(_make_task)


def checkpoint_documents(corpus: str) -> list[str]:
    """The text a checkpoints spec measures with (each model tokenises it itself)."""
    from workers.checkpoints import CheckpointError, corpus_documents

    try:
        return corpus_documents(corpus)
    except CheckpointError as exc:
        raise SpecError(f"corpus: {exc}") from None


# A replacement for workers.checkpoints.measure_entry (same signature), shipped to every worker:
# the tests' way to make a checkpoint's worker process die. None: the real measurement.
MEASURE = None


def workers_measure_entry(kw: dict, threads: int | None = None):
    from workers.checkpoints import measure_entry

    return measure_entry(kw, threads)


def measure_inline(jobs: list[dict], deliver) -> None:
    """Each checkpoint in this process, one after another: `deliver(index, outcome)`."""
    for i, kw in enumerate(jobs):
        deliver(i, (MEASURE or workers_measure_entry)(kw))


def measure_ray(jobs: list[dict], documents: list[str], resources, address: str | None, deliver) -> None:
    """One Ray task per checkpoint (its documents shipped once), as many at once as the
    resources allow; a task whose worker process dies is retried `resources.max_retries` times,
    and each outcome is delivered to the one writer once, as it arrives."""
    with ray_session(address) as ray:
        check_node_fits(resources.cpus, resources.gpus, ray.nodes(), "each checkpoint asks for", "", resources.memory)
        task = _measure_task.options(num_cpus=resources.cpus, num_gpus=resources.gpus,
                                     max_retries=resources.max_retries,
                                     **({"memory": resources.memory} if resources.memory else {}))
        docs = ray.put(documents)
        pending = {task.remote(kw, docs, max(1, int(resources.cpus)), MEASURE): i for i, kw in enumerate(jobs)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died past its retries: a failed checkpoint
                    outcome = CheckpointResult("failed", time.time(), one_line(exc))
                deliver(i, outcome)


def _make_measure_task():
    import ray

    @ray.remote(max_retries=2)
    def task(kw, documents, threads, measure):
        return (measure or workers_measure_entry)({**kw, "documents": documents}, threads)

    return task


_measure_task = LazyRemote(_make_measure_task)
