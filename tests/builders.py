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


def flat(rank: float, dim: int) -> np.ndarray:
    """k ones and one x ∈ [0, 1): hard rank (k + x)²/(k + x²) = `rank` exactly (a real rank ≤ dim)."""
    k = int(np.floor(rank))
    eig = np.full(dim, 1e-12)
    eig[:k] = 1.0
    r = float(rank)
    if r > k and k < dim:  # (1 − r)x² + 2k·x + (k² − r·k) = 0, the root in [0, 1)
        a, b, c = 1 - r, 2 * k, k * k - r * k
        x = (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)
        x = x if 0 <= x < 1 else (-b - np.sqrt(b * b - 4 * a * c)) / (2 * a)
        eig[k] = max(x, 1e-12)
    return eig


def ranked(ranks: dict, dim: int, *, sites=("pre", "post"), status: str = "done", n_per_dim: int = 10,
           ppl: float = 148.4) -> RunResult:
    """A finished result whose spectra have the given hard ranks: `ranks` maps (step, layer,
    stratum) → rank (None: that stratum skipped), each at every site in `sites`."""
    spectra = [spectrum(step, layer, site, stratum, None if r is None else flat(r, dim), n_per_dim * dim, dim)
               for (step, layer, stratum), r in ranks.items() for site in sites]
    loss = float(np.log(ppl))
    return result(status, spectra, evaluations(sorted({s for s, _, _ in ranks}), loss, loss, ppl))


def decaying(status: str = "done", n_steps: int = 3, dim: int = 32) -> RunResult:
    """A result of `n_steps` measured steps (10, 20, …) whose spectra decay linearly, with a
    slightly negative raw minimum (as a real float64 eigensolver leaves); a failure says "boom"."""
    steps = [10 * (i + 1) for i in range(n_steps)]
    spectra = [spectrum(s, 0, site, "all", np.linspace(1.0, 0.01, dim), 10 * dim, min_eigenvalue=-1e-9)
               for s in steps for site in ("pre", "post")]
    return result(status, spectra, evaluations(steps, 4.0, 4.1, 60.3), None if status == "done" else "boom")
