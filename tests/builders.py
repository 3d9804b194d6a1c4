"""Results as a worker would hand them over, built from the contract's constructors (no training)."""

from __future__ import annotations

import numpy as np

from contract.records import Evaluation, RunResult, Spectrum


def spectrum(step: int, layer: int, site: str, stratum: str, eigenvalues, n_tokens: int, n_dim: int | None = None,
             min_eigenvalue: float = 0.0) -> Spectrum:
    """A measured spectrum, or a skipped one when `eigenvalues` is None (then `n_dim` is required)."""
    if eigenvalues is None:
        return Spectrum.skipped(step=step, layer=layer, site=site, stratum=stratum, n_tokens=n_tokens, n_dim=n_dim)
    eig = np.asarray(eigenvalues, dtype=np.float64)
    return Spectrum(step, layer, site, stratum, n_tokens, n_dim or eig.size, eig, min_eigenvalue)


def evaluations(steps, train_loss: float, val_loss: float, val_ppl: float) -> list[Evaluation]:
    return [Evaluation(s, train_loss, val_loss, val_ppl) for s in steps]


def result(status: str = "done", spectra=(), evals=(), error: str | None = None) -> RunResult:
    """A finished run's result (started at 0, finished at 1, on the CPU)."""
    return RunResult(status=status, evals=list(evals), spectra=list(spectra), started_at=0.0, finished_at=1.0,
                     error=error, device="cpu")
