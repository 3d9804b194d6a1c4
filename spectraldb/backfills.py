"""Python steps of migrations, frozen: each carries the code it ran with when it was written.

A migration is history. Migration 002 computes the Rényi family, EEE and the reinjection table
for runs stored before it; it must compute them the same way forever, whatever later changes
`contract.metrics` sees, so the formulas of that day live here, not imported from there.
"""

from __future__ import annotations

import math

import numpy as np

_ALPHAS_002 = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)


def _p(eig) -> np.ndarray:
    lam = np.clip(np.asarray(eig, dtype=np.float64).ravel(), 1e-12, None)
    return lam / lam.sum()


def _renyi_002(p: np.ndarray, alpha: float) -> float:
    if alpha == 1:
        return math.exp(float(-(p * np.log(p)).sum()))
    if math.isinf(alpha):
        return float(1.0 / p.max())
    return float(math.exp(math.log((p**alpha).sum()) / (1.0 - alpha)))


def _eee_002(p: np.ndarray) -> float:
    s = np.cumsum(np.sort(p)[::-1])
    d = p.size
    return min(1.0, max(0.0, 2.0 / d * float((s - np.arange(1, d + 1) / d).sum())))


def _js_002(pa: np.ndarray, pb: np.ndarray) -> float:
    a, b = np.sort(pa)[::-1], np.sort(pb)[::-1]
    m = (a + b) / 2
    kl = lambda x, y: float((x * np.log(x / y)).sum())  # noqa: E731
    return min(math.log(2), max(0.0, (kl(a, m) + kl(b, m)) / 2))


def migration_002(con) -> None:
    """Backfill the metrics migration 002 added, from the stored eigenvalues of older runs."""
    rows = con.execute("""SELECT run_id, step, layer, site, stratum, eigenvalues FROM spectra
                          WHERE eigenvalues IS NOT NULL ORDER BY run_id""").fetchall()
    spectra = {(rid, step, layer, site, stratum): _p(eig) for rid, step, layer, site, stratum, eig in rows}
    for (rid, step, layer, site, stratum), p in spectra.items():
        renyi = [_renyi_002(p, a) for a in _ALPHAS_002]
        con.execute("""UPDATE ranks SET renyi_0_5 = ?, renyi_1 = ?, renyi_1_5 = ?, renyi_2 = ?, renyi_3 = ?,
                       renyi_5 = ?, renyi_inf = ?, eee = ?
                       WHERE run_id = ? AND step = ? AND layer = ? AND site = ? AND stratum = ?""",
                    [*renyi, _eee_002(p), rid, step, layer, site, stratum])
        post = spectra.get((rid, step, layer, "post", stratum))
        if site == "pre" and post is not None:
            rho = [_renyi_002(post, a) / _renyi_002(p, a) for a in _ALPHAS_002]
            con.execute("INSERT INTO reinjection VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [rid, step, layer, stratum, _js_002(p, post), *rho])
    con.execute("""UPDATE runs SET pos = 'rope', norm = 'pre', postln_frac = 0, activation = 'relu2',
                   keep_eigenvalues = 'all' WHERE pos IS NULL""")


BACKFILL = {2: migration_002}  # migration number → Python step run inside its transaction
