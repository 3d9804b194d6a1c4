"""What a run needs, against what the store and the machine can give, checked before training.

Schema-valid numbers can still be impossible (what the store's INTEGER columns cannot hold the
spec models already refuse): a width whose covariance needs terabytes, a `resources.cpus` no
node has (Ray would wait forever). `estimate_memory` is a deliberately simple upper-bound model (fp32 training state,
activations kept for backward, float64 covariance accumulators); `plan` shows it per run.
"""

from __future__ import annotations

import os
from pathlib import Path

from contract.memory import MemoryBudgetError, MemoryPlan, default_budget, machine_memory, uniform_plan
from spectraldb.errors import SpecError

GiB = 1024**3


def estimate_memory(run) -> int:
    """Bytes one run (one rank of a data-parallel run: its share of the batch) needs at its peak
    (an estimate, not a measurement).

    params P = 2·V·d + L·(4·d² + 2·d·D) (+ T·d learned positions); weights, gradients and up to
    two optimizer states are 4 bytes each (16·P); activations kept for backward ≈
    B·T·L·(16·d + 3·D) floats plus logits B·T·V·3 floats; measurement holds the float64
    accumulators of its largest pass (`measurement_plan`) plus one chunk of activations.
    """
    m, d, t = run.model, run.data, run.train
    V, dm, L, T, B = d.vocab_size, m.d_model, m.n_layer, d.context, t.batch_size // run.resources.workers
    D = m.ffn_width
    params = 2 * V * dm + L * (4 * dm * dm + 2 * dm * D) + (T * dm if m.pos == "learned" else 0)
    training = 16 * params + 4 * B * T * (L * (16 * dm + 3 * D) + 3 * V)
    measuring = measurement_plan(run).peak + 8 * 64 * T * D * 2
    return int(training + measuring)


def measurement_plan(run) -> MemoryPlan:
    """The passes one measurement of `run` takes under its `measure.memory` (default: a share of
    this machine's memory). Refuses (SpecError) a budget that one layer × site alone exceeds."""
    budget = run.measure.memory if run.measure.memory is not None else default_budget()
    try:
        return uniform_plan(run.model.n_layer * len(run.measure.sites), run.model.ffn_width, run.measure.strata, budget)
    except MemoryBudgetError as exc:
        raise SpecError(f"{exc} ({_name(run)})") from None


def _name(run) -> str:
    return f"run {run.run_id} ({run.label}, ffn_mult={run.model.ffn_mult:g}, seed={run.train.seed})"


def preflight(runs, executor: str, address: str | None) -> None:
    """Refuse, before anything trains, runs that cannot fit this machine or this local Ray."""
    local = address is None
    mem = machine_memory()
    cpus = os.cpu_count() or 1
    for r in runs:
        need = estimate_memory(r)  # refuses a measurement budget that one layer × site exceeds
        if local and need > mem:
            raise SpecError(f"model: {_name(r)} needs an estimated {need / GiB:,.1f} GiB of memory; this "
                            f"machine has {mem / GiB:,.1f} GiB (see `specdb plan` for every run's estimate)")
        if r.resources.workers > 1 and executor != "ray":
            raise SpecError(f"resources.workers: {r.resources.workers} ranks need --executor ray (a data-parallel run "
                            f"trains on Ray Train); --executor {executor} trains one process per run")
        if local and executor == "ray" and r.resources.workers > 1 and r.resources.workers * r.resources.cpus > cpus:
            raise SpecError(f"resources.workers: {r.resources.workers} workers × {r.resources.cpus:g} CPUs exceed the "
                            f"{cpus} CPUs of this machine (the run could never start)")
        if local and executor == "ray" and r.resources.workers > 1 and r.resources.workers * r.resources.gpus > _local_gpus() > 0:
            raise SpecError(f"resources.workers: {r.resources.workers} workers × {r.resources.gpus:g} GPUs exceed the "
                            f"{_local_gpus()} GPUs of this machine (the run could never start)")
        if local and executor == "ray" and r.resources.cpus > cpus:
            raise SpecError(f"resources.cpus: {r.resources.cpus:g} exceeds the {cpus} CPUs of this machine "
                            "(Ray would wait for them forever)")
        if local and executor == "ray" and r.resources.gpus > 0 and not _local_gpus():
            raise SpecError(f"resources.gpus: {r.resources.gpus:g} asked for, but this machine has no GPU "
                            "(Ray would wait for one forever)")
        if local and r.train.device == "cuda" and not _local_gpus():
            raise SpecError("train.device: cuda asked for, but no GPU is visible here (every run would fail); "
                            "use auto or cpu")
        if r.checkpoint is not None:
            check_folder_writable(r.checkpoint.dir, "checkpoint.dir")


def check_folder_writable(folder, field: str) -> None:
    """A folder a run will create files in: it exists and takes a file, or its nearest existing
    ancestor is a folder that does (checked with a real probe: permission bits say nothing for
    root or on a read-only mount). Nothing is left behind."""
    import tempfile

    path = Path(folder).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise SpecError(f"{field}: {folder}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".specdb-probe-"):
            pass
    except OSError as exc:
        raise SpecError(f"{field}: {folder} is not writable ({exc.strerror or exc})") from None


def check_cluster(runs, nodes: list[dict]) -> None:
    """Against a Ray cluster: every worker of a run must fit on a live node, and all of a run's
    workers on the cluster at once (a data-parallel run starts only when all are placed)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    for r in runs:
        res = r.resources
        check_node_fits(res.cpus, res.gpus, nodes, f"{_name(r)} asks for", "per worker")
        # how many of the run's workers each node can hold at once
        fits = sum(min(int(node.get("CPU", 0) // res.cpus), int(node.get("GPU", 0) // res.gpus) if res.gpus else
                       10**9) for node in alive)
        if fits < res.workers:
            raise SpecError(f"resources.workers: {_name(r)} needs {res.workers} workers of {res.cpus:g} CPUs and "
                            f"{res.gpus:g} GPUs at once; the Ray cluster can ever hold {fits}")


def check_node_fits(cpus: float, gpus: float, nodes: list[dict], who: str, per: str, memory: int | None = None) -> None:
    """Some live node of the Ray cluster holds `cpus`, `gpus` and `memory` bytes (else the task
    waits forever)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    if not any(node.get("CPU", 0) >= cpus and node.get("GPU", 0) >= gpus and node.get("memory", 0) >= (memory or 0)
               for node in alive):
        asked = f"{cpus:g} CPUs and {gpus:g} GPUs" + (f" and {memory:,} bytes of memory" if memory else "")
        raise SpecError(f"resources: {who} {asked}{' ' + per if per else ''}; no node of the Ray cluster "
                        "has that much")


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch or no driver: no GPU
        return 0


