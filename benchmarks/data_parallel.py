"""Two data-parallel ranks against one process, side by side in one invocation (issue 19's goals).

    python benchmarks/data_parallel.py                   # CPU: gloo, 2 ranks × 1 thread vs 1 process × 2 threads
    python benchmarks/data_parallel.py --device cuda     # 2 GPUs: NCCL ranks, the GPU check
    python benchmarks/data_parallel.py --quick           # a tiny config (what the test suite runs)

Both sides run specdb's own loop (`workers.train.run`) on the same spec and the same global
batch; the ranks are plain torch.distributed processes (no Ray: Ray Train's start-up is a fixed
cost per run, reported separately in docs/benchmarks.md). Printed:

1. the training and validation losses of both sides at every measured step, and the largest
   relative difference (the ranks average two half-batch gradients, one process takes the mean
   over the whole batch: float32 sums in another order);
2. the stored spectra of a second pair of runs at lr 1e-30, whose weights stay bitwise at their
   seeded values, so both sides measure the same weights on the same tokens and only the
   reduction across ranks differs: the largest relative eigenvalue difference (goal ≤ 1e-9);
3. wall time of each side and their ratio, the share of the ranks' time spent measuring
   (forwards and folds, `accumulate`), and the time spent reducing moments across ranks.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import numpy as np
import torch
import torch.multiprocessing as mp


def spec(device: str, quick: bool, lr: float):
    from spectraldb.spec import RunSpec

    if quick:
        model, train = {"n_layer": 1, "d_model": 16, "n_head": 2, "ffn_mult": 2}, {"steps": 4, "batch_size": 8}
        data, measure = {"vocab_size": 512, "context": 16}, {"every": 2, "tokens": 64, "all_tokens": 128}
    else:
        model, train = {"n_layer": 2, "d_model": 128, "n_head": 4, "ffn_mult": 4}, {"steps": 60, "batch_size": 32}
        data, measure = {"vocab_size": 2048, "context": 128}, {"every": 10, "tokens": 2048, "all_tokens": 4096}
    return RunSpec.model_validate({
        "data": {"corpus": "sotu", **data}, "model": model,
        "train": {**train, "seed": 0, "device": device, "eval_tokens": 4096},
        "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.0},
        "measure": {**measure, "last_k": 2, "source": "train_batch", "min_stratum_tokens": 20},
        "resources": {"workers": 2}})


class Timed:
    """Wraps a function and sums its wall time (synchronising CUDA first)."""

    def __init__(self, fn, device: str):
        self.fn, self.device, self.total = fn, device, 0.0

    def __call__(self, *a, **kw):
        sync(self.device)
        t = time.perf_counter()
        out = self.fn(*a, **kw)
        sync(self.device)
        self.total += time.perf_counter() - t
        return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rank_main(rank: int, port: int, config, ds, device: str, out):
    import torch.distributed as dist

    from workers import probe, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=2)
    measuring = Timed(train.accumulate, device)
    reducing = Timed(probe.reduce_across_ranks, device)
    train.accumulate, probe.reduce_across_ranks = measuring, reducing
    dist.barrier()
    t = time.perf_counter()
    result = train.run(config, ds, threads=1, distributed=True)
    wall = time.perf_counter() - t
    if rank == 0:
        out.put({"result": result.to_dict(), "wall": wall, "measuring": measuring.total, "reducing": reducing.total})
        out.close()
        out.join_thread()  # the result is flushed to the pipe before this process leaves
    dist.barrier()
    dist.destroy_process_group()
    # skip the interpreter's teardown: gloo's and the BLAS pools' threads can abort it
    # ("terminate called without an active exception") after the work is done
    os._exit(0)


def two_ranks(config, ds, device: str) -> dict:
    from contract.records import RunResult

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, port, config, ds, device, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = out.get(timeout=3600)
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"rank exited with code {p.exitcode}")
    got["result"] = RunResult.from_dict(got["result"])
    return got


def one_process(config, ds, device: str, threads: int) -> dict:
    from workers import train

    t = time.perf_counter()
    result = train.run(config, ds, threads=threads)
    return {"result": result, "wall": time.perf_counter() - t}


def spectra_gap(a, b) -> float:
    key = lambda r: (r.step, r.layer, r.site, r.stratum)  # noqa: E731
    worst = 0.0
    pairs = list(zip(sorted(a.spectra, key=key), sorted(b.spectra, key=key)))
    assert len(a.spectra) == len(b.spectra) and all(key(x) == key(y) and x.n_tokens == y.n_tokens for x, y in pairs)
    for x, y in pairs:
        if y.eigenvalues is not None:
            worst = max(worst, float(np.max(np.abs(x.eigenvalues - y.eigenvalues) / np.abs(y.eigenvalues).max())))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny config (seconds)")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit(f"--device cuda needs 2 GPUs; {torch.cuda.device_count()} visible")
    from workers.data import prepare

    trained = spec(args.device, args.quick, 3e-3)
    ds = prepare(trained.worker_config().data)
    print(f"config: {trained.model.n_layer} layers, d_model {trained.model.d_model}, D {trained.model.ffn_width}, "
          f"{trained.train.steps} steps × {trained.train.batch_size} sequences of {trained.data.context}; "
          f"`all` on {trained.measure.pooled_tokens} tokens, strata on {trained.measure.tokens} (rank 0's share)")
    ranks = two_ranks(trained.worker_config(), ds, args.device)
    single = one_process(trained.worker_config(), ds, args.device, threads=2)
    print("\nstep  train loss (2 ranks / 1 process)     val loss (2 ranks / 1 process)")
    worst = 0.0
    for a, b in zip(ranks["result"].evals, single["result"].evals):
        rel = max(abs(a.train_loss - b.train_loss) / abs(b.train_loss), abs(a.val_loss - b.val_loss) / abs(b.val_loss))
        worst = max(worst, rel)
        print(f"{a.step:>4}  {a.train_loss:.7f} / {b.train_loss:.7f}      {a.val_loss:.7f} / {b.val_loss:.7f}")
    print(f"largest relative loss difference: {worst:.2e}")
    print(f"trained spectra, largest relative eigenvalue difference: {spectra_gap(ranks['result'], single['result']):.2e}")

    frozen = spec(args.device, args.quick, 1e-30)
    gap = spectra_gap(two_ranks(frozen.worker_config(), ds, args.device)["result"],
                      one_process(frozen.worker_config(), ds, args.device, threads=2)["result"])
    print(f"same weights, same tokens (lr 1e-30): largest relative eigenvalue difference {gap:.2e} (goal ≤ 1e-9)")

    print(f"\nwall: 2 ranks {ranks['wall']:.2f} s, 1 process {single['wall']:.2f} s, "
          f"ratio {ranks['wall'] / single['wall']:.2f}")
    backend = "NCCL" if args.device == "cuda" else "gloo"
    print(f"rank 0: measuring {ranks['measuring']:.2f} s ({ranks['measuring'] / ranks['wall']:.1%} of its wall), "
          f"of which in the reduction across ranks ({backend}, waiting for the slower rank included) "
          f"{ranks['reducing'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
