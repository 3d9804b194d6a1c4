"""The records a worker hands the driver (docs/design.md §4): plain dicts at run time, so they
cross Ray and the spool unchanged, typed here so every reader knows their fields."""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class EvalRecord(TypedDict):
    step: int
    train_loss: float
    val_loss: float
    val_ppl: float


class SpectrumRecord(TypedDict):
    step: int
    layer: int
    site: Literal["pre", "post"]
    stratum: Literal["all", "head", "mid", "tail"]
    n_tokens: int
    n_dim: int
    eigenvalues: Any            # numpy float64 array, descending; None when the stratum was skipped
    min_eigenvalue: float | None  # the raw minimum before clamping; None when skipped


class RunResult(TypedDict, total=False):
    status: Literal["running", "done", "diverged", "failed"]
    error: str | None
    evals: list[EvalRecord]
    spectra: list[SpectrumRecord]
    started_at: float
    finished_at: float
    device: str | None
    protocol: int
    vocab_size: int             # added by the driver's executor
    resumed_from: int           # set when the run resumed from a checkpoint
