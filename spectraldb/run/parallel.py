"""Data-parallel runs: one run across `resources.workers` ranks on Ray Train (docs/design.md §4).

Each run with more than one worker is a Ray task holding no resources of its own that calls
`TorchTrainer.fit()`: Ray Train places all the run's workers at once (a placement group) or
none, so a waiting multi-worker run never holds CPUs that one-worker runs need, and the driver
goes on collecting results. The process group is gloo on CPUs and NCCL with GPUs, with the
spec's `resources.collective_timeout_s`.

Every rank runs `workers.train.run(…, distributed=True)`; rank 0 hands its result to the
sweep's board actor (beside the driver), which the task returns, so a result crosses back
exactly once. When a rank dies, Ray Train stops the others and starts the group again, up to
`resources.max_retries` times; the new group resumes from the checkpoint rank 0 wrote
(`checkpoint.dir`, a path every node must see). Used by spectraldb.run.executors' Ray path.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from contract.records import RunResult
from spectraldb.errors import one_line
from spectraldb.run.remote import LazyRemote
from spectraldb.sidecar.progress import Throttle


def submit(run, data_ref, board, checkpoint: str | None, train_hook=None):
    """Start one data-parallel run; the ObjectRef of its result dict."""
    # the data's ref inside a list: a task's top-level refs arrive resolved, and only the ranks need the data
    return _launch.options(num_cpus=0, max_retries=0).remote(
        run.worker_config(), run.resources.model_dump(), [data_ref], board, run.run_id,
        checkpoint and str(Path(checkpoint).absolute()), train_hook)


def rank_main(cfg: dict) -> None:
    """The loop of one rank (Ray Train's `train_loop_per_worker`)."""
    import ray
    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    config = cfg["config"]
    if config.resources.gpus > 0:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    throttle = Throttle(1.0)

    def progress(step, steps):
        if rank == 0 and throttle.ready(step, steps):
            cfg["board"].report.remote(cfg["run_id"], step, steps)

    if cfg["train"] is None:
        from workers.train import run as train
    else:
        train = cfg["train"]
    ds = cfg["data"][0]  # the dataset's ObjectRef: fetched once per rank
    result = train(config, ray.get(ds), progress, max(1, int(config.resources.cpus)), checkpoint=cfg["checkpoint"],
                   distributed=True)
    if rank == 0:
        ray.get(cfg["board"].deliver.remote(cfg["run_id"], result.to_dict()))


def _make_launch():
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def launch(config, res, data, board, run_id, checkpoint, train_hook):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        storage = tempfile.mkdtemp(prefix="specdb-train-")  # Ray Train's own run state; specdb keeps none of it
        per_worker = {"CPU": res["cpus"], **({"GPU": res["gpus"]} if res["gpus"] else {})}
        trainer = TorchTrainer(
            rank_main,
            train_loop_config={"config": config, "data": data, "board": board, "run_id": run_id,
                               "checkpoint": checkpoint, "train": train_hook},
            torch_config=TorchConfig(backend="nccl" if res["gpus"] else "gloo", timeout_s=res["collective_timeout_s"]),
            scaling_config=ScalingConfig(num_workers=res["workers"], use_gpu=res["gpus"] > 0,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(name=f"specdb-{run_id}", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=res["max_retries"])))
        error = None
        try:
            trainer.fit()
        except Exception as exc:  # noqa: BLE001 - every rank failed for good: record it, the sweep goes on
            error = f"data-parallel run failed after {res['max_retries']} retries: {type(exc).__name__}: {one_line(exc)}"
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        delivered = ray.get(board.collect.remote(run_id))
        if error is None and delivered is not None:
            return delivered
        out = RunResult.from_dict(delivered) if delivered else RunResult()
        return out.finish("failed", error or "rank 0 delivered no result").to_dict()

    return launch


_launch = LazyRemote(_make_launch)
