"""One run: train the model and measure its FFN spectra on the schedule (docs/design.md §1–2).

`run(config, dataset)` takes a resolved run spec as a plain dict and returns plain results;
it never touches the database (only the driver writes) and never imports ray. With
`distributed=True` it is one rank of a data-parallel run (workers.ranks); rank 0's result holds
the run's measurements.

Protocol 3's timing: the step-s spectrum and validation loss are of the weights after s updates.
On `train_batch` the spectrum is of the next batch, before update s+1, as the study measured;
the last step's is of one more batch drawn after the last update.
"""

from __future__ import annotations

import math
import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from contract.config import RunConfig
from contract.records import Evaluation, RunResult, Spectrum, perplexity
from contract.sizes import is_measured
from workers.data import Dataset, eval_batch, measurement_batch
from workers.extract import NonFiniteActivations, decompose
from workers.measurement import accumulate
from workers.model import GPT, GPTConfig
from workers.optim import build_optimizers, lr_multiplier, set_lr
from workers.ranks import Ranks

Progress = Callable[[int, int], None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible to this worker")
    return torch.device(name)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, autocast_dtype, chunk: int = 64, ranks: Ranks | None = None) -> float:
    """Mean loss over `windows`; with `ranks`, over every rank's windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], chunk):
        w = windows[i:i + chunk]
        with torch.autocast(w.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, loss = model(w[:, :-1], w[:, 1:])
        total += loss.item() * w.shape[0]
        count += w.shape[0]
    model.train()
    if ranks is not None:
        total, count = ranks.sum(total, count)
    return total / count


def run(config: RunConfig, ds: Dataset, progress: Progress | None = None, threads: int | None = None,
        checkpoint: str | Path | None = None, overlap: bool = True, distributed: bool = False) -> RunResult:
    """Train and measure one run; failures come back as status 'failed' with what was measured.

    `config` is the typed record of contract/config.py (`RunSpec.worker_config()`). With
    `checkpoint` (a file path) and `config.checkpoint_every`, the run saves its whole
    state there every N steps and, if the file exists when it starts, resumes from it: a resumed
    run ends with exactly the measurements of an uninterrupted one (bitwise on CPU).
    `overlap` False decomposes each measured step inline (the same numbers, later). With
    `distributed` this process is one rank of the torch.distributed process group; rank 0 writes
    the checkpoint and holds the measurements, every rank reads the checkpoint on resume.
    """
    result = RunResult()
    try:
        with ExitStack() as stack:
            if threads:  # scipy's BLAS (the covariance products) shares the run's cores too
                stack.enter_context(threadpool_limits(threads, user_api="blas"))
            background = stack.enter_context(Decompositions(result, threads, overlap))
            _run(config, ds, result, progress, threads, Path(checkpoint) if checkpoint else None, background,
                 distributed)
    except Exception:  # noqa: BLE001 - the driver records the failure, the sweep goes on
        return result.finish("failed", traceback.format_exc(limit=8))
    return result.finish()


class Decompositions:
    """Eigendecompositions and metrics of measured steps, off the training loop.

    `submit` hands a step's accumulated moments to one background thread (with its own CUDA
    stream on a GPU) and returns at once; the records land in `result.spectra`, in step order,
    at the next `join` — before the next measured step, a checkpoint, and the end of the run.
    With `overlap` False the work runs inline: the reference the overlapped path must equal.
    """

    def __init__(self, result: RunResult, threads: int | None, overlap: bool = True):
        self.result, self.threads, self.overlap = result, threads, overlap
        self.pool = self.pending = self.stream = None

    def __enter__(self) -> "Decompositions":
        return self

    def submit(self, step: int, selected: list, precision: str, which: str = "full") -> None:
        self.join()
        if not self.overlap:
            self._land(decompose(selected, precision, step, which))
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="specdb-decompose")
        ready = None
        if any(cov is not None and cov.device.type == "cuda" for _, cov in selected):
            self.stream = self.stream or torch.cuda.Stream()
            ready = torch.cuda.Event()
            ready.record()  # the moments are complete on the training stream at this point
        self.pending = self.pool.submit(self._work, selected, precision, step, ready, which)

    def _work(self, selected: list, precision: str, step: int, ready, which: str) -> list[Spectrum]:
        if self.threads:
            torch.set_num_threads(self.threads)
        if ready is None:
            return decompose(selected, precision, step, which)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            return decompose(selected, precision, step, which)

    def join(self) -> None:
        if self.pending is not None:
            future, self.pending = self.pending, None
            self._land(future.result())

    def _land(self, records: list[Spectrum]) -> None:
        self.result.spectra.extend(records)

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self.join()
            elif self.pending is not None:  # the run failed: keep what finished, report the first error
                try:
                    self.join()
                except Exception:  # noqa: BLE001
                    pass
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)


def _run(config: RunConfig, ds: Dataset, result: RunResult, progress: Progress | None, threads: int | None,
         ckpt_path: Path | None, background: Decompositions, distributed: bool) -> None:
    tr, ms = config.train, config.measure
    device = pick_device(tr.device)
    result.device = str(device)
    ranks = Ranks(distributed, device)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(tr.seed)
    rng = np.random.default_rng(tr.seed)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    result.forward_dtype = "bfloat16" if autocast is not None else "float32"
    precision = ms.precision

    cfg = GPTConfig.from_run(config, ds.vocab_size)
    model = GPT(cfg).to(device)  # the same seed on every rank: the same initial weights
    optimizers = build_optimizers(model, config.optimizer)
    T, B, steps = cfg.context, tr.batch_size, tr.steps
    mine = ranks.rows(B)
    train = ds.train  # numpy (uint16 shards or int32): gather each batch, never copy the corpus
    if train.size < T + 2:
        raise ValueError("the training split is shorter than one context window")
    windows = eval_batch(ds, tr.eval_tokens, T)
    windows = np.array_split(windows, ranks.world)[ranks.rank]
    evals = torch.from_numpy(windows.astype(np.int64)).to(device)
    token_strata = torch.from_numpy(ds.strata.astype(np.int64)).to(device)
    # budgets in positions of the whole measurement batch, whole sequences: the strata's first, then `all`'s
    strata_budget = ms.tokens // T * T
    all_budget = max(strata_budget, ms.pooled_tokens // T * T)
    fixed = torch.from_numpy(measurement_batch(ds, all_budget, T).astype(np.int64)).to(device) \
        if ms.source == "heldout" else None
    every = config.checkpoint_every if ckpt_path else None
    first = 1
    if every and ckpt_path.exists():
        first = _restore(ckpt_path, model, optimizers, rng, result, device) + 1

    def draw() -> torch.Tensor:  # the global batch's starts on every rank; this rank's rows of it
        starts = rng.integers(0, train.size - T - 1, size=B)[mine]
        return torch.from_numpy(train[starts[:, None] + np.arange(T + 1)].astype(np.int64)).to(device)

    def measure(step: int, rows: torch.Tensor, offset: int) -> bool:
        """Spectra of the current weights, labelled `step`, on `rows` that start `offset` positions
        into the measurement batch; the reduction across ranks happens inside (every rank calls
        this). False when the activations are non-finite (the run has diverged)."""
        background.join()
        span = rows.shape[0] * T
        limit = min(max(0, strata_budget - offset), span)
        all_limit = min(max(0, all_budget - offset), span)
        used = rows[: max(1, -(-all_limit // T))]  # a rank with nothing to count still joins the reduction
        try:
            records = accumulate(model, used, token_strata, sites=ms.sites, strata=ms.strata,
                                 min_tokens=ms.min_stratum_tokens, autocast_dtype=autocast, precision=precision,
                                 limit=limit, all_limit=all_limit, memory=ms.memory, which=ms.metrics)
        except NonFiniteActivations as exc:
            _diverged(result, f"diverged at step {step} (rule: non-finite activations): {exc}")
            return False
        if ranks.leader:
            background.submit(step, records, precision, ms.metrics)
        return True

    def measure_batch(step: int, batch: torch.Tensor) -> bool:
        return measure(step, batch[:, :-1], mine.start * T)

    for step in range(first, steps + 1):
        batch = draw()
        if fixed is None and step > 1 and is_measured(step - 1, steps, ms.every):
            # the study's timing: spectrum s-1 is of the batch update s is about to learn from
            if not measure_batch(step - 1, batch):
                return
        x, y = batch[:, :-1], batch[:, 1:]
        set_lr(optimizers, lr_multiplier(step, steps, tr.warmup, tr.warmdown))
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            _, loss = model(x, y)
        loss.backward()
        ranks.average_gradients(model)
        train_loss, = ranks.sum(loss.item() / ranks.world)  # the global batch's loss: every rank decides alike
        if math.isfinite(train_loss):
            for opt in optimizers:
                opt.step()
        model.zero_grad(set_to_none=True)
        measured = is_measured(step, steps, ms.every)
        if measured or not math.isfinite(train_loss):
            val_loss = evaluate(model, evals, autocast, ranks=ranks) if math.isfinite(train_loss) else math.nan
            result.evals.append(Evaluation(step, train_loss, val_loss, perplexity(val_loss)))
            # a non-finite loss stops the run at once; the perplexity rule is the study's, applied to
            # the final evaluation only (a barely trained model is still above it mid-run)
            if not math.isfinite(val_loss):
                return _diverged(result, f"diverged at step {step} (rule: non-finite loss): train loss "
                                         f"{train_loss}, val loss {val_loss}")
            if fixed is not None:
                if not measure(step, fixed if ranks.leader else fixed[:1], 0 if ranks.leader else all_budget):
                    return
            elif step == steps and not measure_batch(step, draw()):  # after the last update
                return
        if every and step % every == 0 and step < steps:
            background.join()
            if ranks.leader:
                _save(ckpt_path, step, model, optimizers, rng, result)
        if progress is not None:
            progress(step, steps)
    background.join()
    result.status = "done"
    threshold = tr.diverged_ppl
    final = result.final
    if final is not None and final.step == steps and final.val_ppl > threshold:
        _diverged(result, f"diverged (rule: final val ppl {final.val_ppl:.1f} > train.diverged_ppl "
                          f"{threshold:g})")


def _save(path: Path, step: int, model, optimizers, rng, result: RunResult) -> None:
    """Everything the loop needs to continue exactly: weights, optimizer states, both RNGs, the
    step (which fixes the data position, since batches come from the numpy RNG) and the
    measurements so far. Written to a temporary file and renamed, so a crash never leaves half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
             "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "result": result.to_dict()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _restore(path: Path, model, optimizers, rng, result: RunResult, device) -> int:
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["model"])
    for opt, sd in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(sd)
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    # checkpoints written before the contract held the measurements as two lists
    saved = RunResult.from_dict(state.get("result") or {"status": "running", "evals": state["evals"],
                                                         "spectra": state["spectra"]})
    result.evals, result.spectra, result.resumed_from = saved.evals, saved.spectra, state["step"]
    return state["step"]


def _diverged(result: RunResult, message: str) -> None:
    """Stop the run; the measurements of earlier steps stay in the result (the caller's
    Decompositions lands the last of them on the way out)."""
    result.status, result.error = "diverged", message
