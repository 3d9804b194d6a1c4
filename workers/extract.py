"""Streaming FFN-activation covariances, their eigenvalues and metrics (docs/design.md §1).

Activations are never stored: each forward hook folds its (N, D) chunk into running moments
(Chan's merge: count, mean, centred scatter, kept in float64), so memory is O(D²) per
accumulator whatever N is. A measurement has two halves, so the second can leave the
training loop (workers/train.py runs it on a background thread):

- `workers.measurement.accumulate` needs this step's weights: it runs the tokens through the
  model and the probe folds each chunk here; per chunk the positions are sorted by stratum once,
  and each stratum's centred product is one symmetric rank-k update (SYRK, half the work of a
  GEMM) in the precision's accumulation dtype;
- `decompose` turns the moments into spectra (one batched `eigvalsh` per width, on the device
  that holds them) and the spectra into the metric suite (`contract.metrics`).

The precision policy (`PRECISIONS`) comes from measurement: docs/benchmarks.md, "Precision".
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.linalg import blas

from contract import metrics
from contract.records import Spectrum


class Precision(NamedTuple):
    accumulate: torch.dtype   # dtype of each chunk's centred product (the fold is always fp64)
    decompose: torch.dtype    # dtype of the eigensolver


PRECISIONS = {"fp64": Precision(torch.float64, torch.float64),
              "fp32": Precision(torch.float32, torch.float64)}


from contract.memory import BATCH_BYTES  # the most one stacked eigvalsh batch copies


class NonFiniteActivations(ArithmeticError):
    """The model produced inf/NaN activations: the run has diverged."""


def gram(xc: torch.Tensor) -> torch.Tensor:
    """XᵀX of an (N, D) tensor. Only the upper triangle is meaningful on a CPU (BLAS syrk from
    scipy's OpenBLAS: its threads are capped with threadpoolctl by whoever runs the loop)."""
    if xc.device.type != "cpu":
        return xc.mT @ xc
    a = xc.contiguous().numpy()  # C-ordered (N, D), so a.T is a Fortran (D, N) view: no copy
    syrk = blas.dsyrk if a.dtype == np.float64 else blas.ssyrk
    return torch.from_numpy(syrk(1.0, a.T))


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix whose upper triangle is `upper`'s."""
    return torch.triu(upper) + torch.triu(upper, 1).mT


class StreamingCovariance:
    """Mean-centred feature covariance C = (X−μ)ᵀ(X−μ)/(N−1), accumulated chunk by chunk."""

    def __init__(self, dim: int, accumulate: torch.dtype = torch.float64, device="cpu"):
        self.dim, self.accumulate, self.device = dim, accumulate, torch.device(device)
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)  # upper triangle

    def update(self, x) -> "StreamingCovariance":
        x = torch.as_tensor(x).to(device=self.device, dtype=self.accumulate, copy=True)
        return self._update_owned(x.reshape(-1, self.dim))

    def _update_owned(self, x: torch.Tensor) -> "StreamingCovariance":
        """`update` for rows this accumulator may overwrite (centred in place: no copy)."""
        nb = x.shape[0]
        if nb:
            mb = x.mean(0)
            self._fold(nb, mb.double(), gram(x.sub_(mb)).double())
        return self

    def fold_moments(self, nb: int, mb: torch.Tensor, m2b: torch.Tensor) -> "StreamingCovariance":
        """Fold a chunk given as (count, float64 mean, centred scatter's upper triangle)."""
        if nb:
            self._fold(nb, mb.to(self.m2), m2b.to(self.m2))
        return self

    def merge(self, other: "StreamingCovariance") -> "StreamingCovariance":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge dims {other.dim} and {self.dim}")
        if other.n:
            self._fold(other.n, other.mean.to(self.m2), other.m2.to(self.m2))
        return self

    def _fold(self, nb: int, mb: torch.Tensor, m2b: torch.Tensor) -> None:
        n = self.n + nb
        delta = mb - self.mean
        self.m2.add_(m2b).addr_(delta, delta, alpha=self.n * nb / n)  # in place: no D×D temporaries
        self.mean.add_(delta, alpha=nb / n)
        self.n = n

    def scaled(self) -> torch.Tensor:
        """m2/(N−1) on the device: the covariance's upper triangle."""
        if self.n < 2:
            raise ValueError("a covariance needs at least two samples")
        return self.m2 / (self.n - 1)

    def covariance(self) -> np.ndarray:
        return symmetric(self.scaled()).cpu().numpy()

    def spectrum(self, dtype: torch.dtype = torch.float64) -> tuple[np.ndarray, float]:
        """(eigenvalues descending and clamped at 1e-12, the most negative raw eigenvalue)."""
        if not torch.isfinite(self.m2).all():
            raise NonFiniteActivations("non-finite FFN activations: the covariance has inf or NaN entries")
        return spectra_of([self.scaled()], dtype)[0]

    def eigenvalues(self) -> np.ndarray:
        return self.spectrum()[0]


def spectra_of(upper: list, dtype: torch.dtype = torch.float64) -> list[tuple[np.ndarray, float]]:
    """Eigenvalues of symmetric matrices given by their upper triangles (tensors, or
    StreamingCovariances scaled one batch at a time, so no second copy of them all exists): one
    batched `eigvalsh` per size, on the device that holds them. Each: (descending, clamped at
    1e-12; raw minimum)."""
    out: list = [None] * len(upper)
    by_dim: dict[int, list[int]] = {}
    for i, c in enumerate(upper):
        by_dim.setdefault(c.dim if isinstance(c, StreamingCovariance) else c.shape[-1], []).append(i)
    for dim, idx in by_dim.items():
        per_batch = max(1, BATCH_BYTES // (8 * dim * dim))  # the stacked copy stays bounded: 3 at D = 6144
        for start in range(0, len(idx), per_batch):
            part = idx[start:start + per_batch]
            batch = torch.stack([_upper(upper[i]) for i in part]).to(dtype)
            eig = torch.linalg.eigvalsh(batch, UPLO="U").double().cpu().numpy()
            for i, e in zip(part, eig):
                e = e[::-1].copy()
                out[i] = (np.clip(e, metrics.EIG_FLOOR, None), float(e.min()))
    return out


def _upper(c) -> torch.Tensor:
    return c.scaled() if isinstance(c, StreamingCovariance) else c


METRIC_SETS = ("full", "hard_only")  # every metric from the eigenvalues | the hard rank alone, without them


def eigenvalues_of(selected: list[tuple[Spectrum, object]], precision: str = "fp64", which: str = "full") -> None:
    """Fill in the eigenvalues of every selected record that has a covariance; with `hard_only`
    its hard rank instead, tr(C)²/‖C‖_F² (contract.metrics), and no eigendecomposition."""
    todo = [(rec, cov) for rec, cov in selected if cov is not None]
    if which == "hard_only":
        for rec, cov in todo:
            rec.metrics = {"hard_rank": metrics.hard_rank_of_covariance(cov.covariance())}
        return
    done = spectra_of([cov for _, cov in todo], PRECISIONS[precision].decompose)
    for (rec, _), (eig, low) in zip(todo, done):
        rec.eigenvalues, rec.min_eigenvalue = eig, low


def decompose(selected: list[tuple[Spectrum, object]], precision: str = "fp64", step: int = 0,
              which: str = "full") -> list[Spectrum]:
    """Spectra and metrics of what `accumulate` selected, at `step` (safe to run on another thread).
    A record without a covariance is skipped, or was decomposed in an earlier pass."""
    eigenvalues_of(selected, precision, which)
    records = [rec for rec, _ in selected]
    for rec in records:
        rec.step = step
    return metrics.attach_metrics(records)
