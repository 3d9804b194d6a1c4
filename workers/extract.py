"""Streaming FFN-activation covariances and their eigenvalues (docs/design.md §1).

Activations are never stored: each forward hook folds its (N, D) chunk into running moments
(Chan's merge: count, mean, centred scatter), so memory is O(D²) per accumulator whatever N is.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SITES = ("pre", "post")
STRATA = ("head", "mid", "tail")  # 'all' is the merge of the three, so it costs nothing extra


class NonFiniteActivations(ArithmeticError):
    """The model produced inf/NaN activations: the run has diverged."""


class StreamingCovariance:
    """Mean-centred feature covariance C = (X−μ)ᵀ(X−μ)/(N−1), accumulated chunk by chunk."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64, device="cpu"):
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        self.n = 0
        self.mean = torch.zeros(dim, dtype=dtype, device=self.device)
        self.m2 = torch.zeros(dim, dim, dtype=dtype, device=self.device)

    def update(self, x) -> "StreamingCovariance":
        x = torch.as_tensor(x).to(device=self.device, dtype=self.dtype).reshape(-1, self.dim)
        nb = x.shape[0]
        if nb:
            mb = x.mean(0)
            xc = x - mb
            self._fold(nb, mb, xc.T @ xc)
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
        self.m2 += m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("a covariance needs at least two samples")
        return (self.m2.double().cpu() / (self.n - 1)).numpy()

    def spectrum(self) -> tuple[np.ndarray, float]:
        """(eigenvalues descending and clamped at 1e-12, the most negative raw eigenvalue)."""
        c = torch.from_numpy(self.covariance())
        if not torch.isfinite(c).all():
            raise NonFiniteActivations("non-finite FFN activations: the covariance has inf or NaN entries")
        eig = torch.linalg.eigvalsh((c + c.T) / 2).numpy()[::-1].copy()
        return np.clip(eig, 1e-12, None), float(eig.min())

    def eigenvalues(self) -> np.ndarray:
        return self.spectrum()[0]


class FFNProbe:
    """Forward hooks on every block's FFN that feed per-stratum covariances.

    `pre` is the output of `mlp.c_fc`; `post` is the input of `mlp.c_proj`. Before each forward,
    `labels` must hold the stratum (0 head, 1 mid, 2 tail) of every input position.
    """

    def __init__(self, model: torch.nn.Module, sites=SITES, dtype=torch.float64, device="cpu"):
        self.sites = tuple(sites)
        D = model.cfg.ffn_width
        self.acc = {(layer, site, s): StreamingCovariance(D, dtype, device)
                    for layer in range(model.cfg.n_layer) for site in self.sites for s in range(3)}
        self.labels: torch.Tensor | None = None
        self._handles = []
        for layer, block in enumerate(model.transformer.h):
            if "pre" in self.sites:
                self._handles.append(block.mlp.c_fc.register_forward_hook(
                    lambda m, inp, out, layer=layer: self._fold(layer, "pre", out)))
            if "post" in self.sites:
                self._handles.append(block.mlp.c_proj.register_forward_pre_hook(
                    lambda m, inp, layer=layer: self._fold(layer, "post", inp[0])))

    def _fold(self, layer: int, site: str, act: torch.Tensor) -> None:
        x = act.detach().reshape(-1, act.shape[-1])
        for s in range(3):
            rows = x[self.labels == s]
            if rows.shape[0]:
                self.acc[(layer, site, s)].update(rows)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def results(self, strata, min_tokens: int) -> list[dict]:
        """One record per layer × site × stratum; a stratum under the token floor is skipped."""
        out = []
        n_layer = 1 + max(k[0] for k in self.acc)
        for layer in range(n_layer):
            for site in self.sites:
                parts = [self.acc[(layer, site, s)] for s in range(3)]
                for name in strata:
                    if name == "all":
                        cov = StreamingCovariance(parts[0].dim, parts[0].dtype, parts[0].device)
                        for p in parts:
                            cov.merge(p)
                    else:
                        cov = parts[STRATA.index(name)]
                    floor = max(min_tokens, math.ceil(cov.dim / 4), 2)
                    rec = {"layer": layer, "site": site, "stratum": name, "n_tokens": cov.n,
                           "n_dim": cov.dim, "eigenvalues": None, "min_eigenvalue": None}
                    if cov.n >= floor:
                        rec["eigenvalues"], rec["min_eigenvalue"] = cov.spectrum()
                    out.append(rec)
        return out


@torch.no_grad()
def measure(model, tokens: torch.Tensor, token_strata: torch.Tensor, *, sites, strata,
            min_tokens: int, chunk: int = 64, autocast_dtype=None, cov_dtype=torch.float64) -> list[dict]:
    """Run `tokens` (n, T) through the model and return every requested spectrum."""
    device = tokens.device
    was_training = model.training
    model.eval()
    probe = FFNProbe(model, sites, cov_dtype, device)
    try:
        for i in range(0, tokens.shape[0], chunk):
            idx = tokens[i:i + chunk]
            probe.labels = token_strata[idx].reshape(-1)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                model.hidden(idx)
    finally:
        probe.remove()
        model.train(was_training)
    return probe.results(strata, min_tokens)
