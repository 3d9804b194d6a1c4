"""One run: train the model and measure its FFN spectra on the schedule (docs/design.md §1–2).

`run(config, dataset)` takes a resolved run spec as a plain dict and returns plain results;
it never touches the database (only the driver writes) and never imports ray.
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

from contract.records import Evaluation, RunResult, Spectrum
from workers.data import Dataset, eval_batch, measurement_batch
from workers.extract import NonFiniteActivations, accumulate, decompose
from workers.model import GPT, GPTConfig
from workers.optim import build_optimizers, lr_multiplier, set_lr

Progress = Callable[[int, int], None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible to this worker")
    return torch.device(name)


def is_measured(step: int, steps: int, every: int) -> bool:
    """The schedule as a predicate: O(1) memory however many steps a run has."""
    return step == 1 or step == steps or step % every == 0


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, autocast_dtype, chunk: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], chunk):
        w = windows[i:i + chunk]
        with torch.autocast(w.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, loss = model(w[:, :-1], w[:, 1:])
        total += loss.item() * w.shape[0]
        count += w.shape[0]
    model.train()
    return total / count


def run(config: dict, ds: Dataset, progress: Progress | None = None, threads: int | None = None,
        checkpoint: str | Path | None = None, overlap: bool = True) -> RunResult:
    """Train and measure one run; failures come back as status 'failed' with what was measured.

    With `checkpoint` (a file path) and `config["checkpoint"]["every"]`, the run saves its whole
    state there every N steps and, if the file exists when it starts, resumes from it: a resumed
    run ends with exactly the measurements of an uninterrupted one (bitwise on CPU).
    `overlap` False decomposes each measured step inline (the same numbers, later).
    """
    result = RunResult()
    try:
        with ExitStack() as stack:
            if threads:  # scipy's BLAS (the covariance products) shares the run's cores too
                stack.enter_context(threadpool_limits(threads, user_api="blas"))
            background = stack.enter_context(Decompositions(result, threads, overlap))
            _run(config, ds, result, progress, threads, Path(checkpoint) if checkpoint else None, background)
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

    def submit(self, step: int, selected: list, precision: str) -> None:
        self.join()
        if not self.overlap:
            self._land(decompose(selected, precision, step))
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="specdb-decompose")
        ready = None
        if any(cov is not None and cov.device.type == "cuda" for _, cov in selected):
            self.stream = self.stream or torch.cuda.Stream()
            ready = torch.cuda.Event()
            ready.record()  # the moments are complete on the training stream at this point
        self.pending = self.pool.submit(self._work, selected, precision, step, ready)

    def _work(self, selected: list, precision: str, step: int, ready) -> list[Spectrum]:
        if self.threads:
            torch.set_num_threads(self.threads)
        if ready is None:
            return decompose(selected, precision, step)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            return decompose(selected, precision, step)

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


def _run(config: dict, ds: Dataset, result: RunResult, progress: Progress | None, threads: int | None,
         ckpt_path: Path | None, background: Decompositions) -> None:
    tr, ms = config["train"], config["measure"]
    device = pick_device(tr["device"])
    result.device = str(device)
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(tr["seed"])
    rng = np.random.default_rng(tr["seed"])
    autocast = torch.bfloat16 if device.type == "cuda" else None
    precision = ms["precision"]

    cfg = GPTConfig.from_run(config, ds.vocab_size)
    model = GPT(cfg).to(device)
    optimizers = build_optimizers(model, config["optimizer"])
    T, B, steps = cfg.context, tr["batch_size"], tr["steps"]
    train = ds.train  # numpy (uint16 shards or int32): gather each batch, never copy the corpus
    if train.size < T + 2:
        raise ValueError("the training split is shorter than one context window")
    evals = torch.from_numpy(eval_batch(ds, tr["eval_tokens"], T).astype(np.int64)).to(device)
    token_strata = torch.from_numpy(ds.strata.astype(np.int64)).to(device)
    fixed = torch.from_numpy(measurement_batch(ds, ms["tokens"], T).astype(np.int64)).to(device) \
        if ms["source"] == "heldout" else None
    every = (config.get("checkpoint") or {}).get("every") if ckpt_path else None
    first = 1
    if every and ckpt_path.exists():
        first = _restore(ckpt_path, model, optimizers, rng, result, device) + 1

    def take(tokens):  # the forward passes run now (they need this step's weights); the rest overlaps
        background.join()
        return accumulate(model, tokens, token_strata, sites=ms["sites"], strata=ms["strata"],
                          min_tokens=ms["min_stratum_tokens"], autocast_dtype=autocast, precision=precision)

    for step in range(first, steps + 1):
        starts = rng.integers(0, train.size - T - 1, size=B)
        batch = torch.from_numpy(train[starts[:, None] + np.arange(T + 1)].astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        set_lr(optimizers, lr_multiplier(step, steps, tr["warmup"], tr["warmdown"]))
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            _, loss = model(x, y)
        loss.backward()
        train_loss = loss.item()
        measured = is_measured(step, steps, ms["every"])
        records = None
        if measured and fixed is None and math.isfinite(train_loss):
            # the study measures the batch it is about to learn from, before the update, and at
            # most `measure.tokens` of it (one data-parallel rank's share at paper scale)
            try:
                records = take(x[: max(1, ms["tokens"] // T)])
            except NonFiniteActivations as exc:
                return _diverged(result, f"diverged at step {step} (rule: non-finite activations): {exc}")
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if measured or not math.isfinite(train_loss):
            val_loss = evaluate(model, evals, autocast) if math.isfinite(train_loss) else math.nan
            val_ppl = math.exp(val_loss) if math.isfinite(val_loss) and val_loss < 700 else math.inf
            result.evals.append(Evaluation(step, train_loss, val_loss, val_ppl))
            # a non-finite loss stops the run at once; the perplexity rule is the study's, applied to
            # the final evaluation only (a barely trained model is still above it mid-run)
            if not math.isfinite(val_loss):
                return _diverged(result, f"diverged at step {step} (rule: non-finite loss): train loss "
                                         f"{train_loss}, val loss {val_loss}")
            if records is None:
                try:
                    records = take(fixed)
                except NonFiniteActivations as exc:
                    return _diverged(result, f"diverged at step {step} (rule: non-finite activations): {exc}")
            background.submit(step, records, precision)
        if every and step % every == 0 and step < steps:
            background.join()
            _save(ckpt_path, step, model, optimizers, rng, result)
        if progress is not None:
            progress(step, steps)
    background.join()
    result.status = "done"
    threshold = tr["diverged_ppl"]
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
