"""Dion (Ahn et al., arXiv 2504.05295; docs/design.md §2), single process, plain PyTorch.

One warm-started power-iteration step gives a rank-r factorisation P·Qᵀ of the momentum;
error feedback removes only the applied part, so the residual stays for later steps.
"""

from __future__ import annotations

import math

import torch

from workers.muon import _MatrixOptimizer


def dion_rank(m: int, n: int, fraction: float, multiple_of: int = 1) -> int:
    """r = k·⌈f·min(m, n)/k⌉, capped at min(m, n)."""
    k = multiple_of
    return min(k * math.ceil(fraction * min(m, n) / k), m, n)


def dion_update(G: torch.Tensor, M: torch.Tensor, Q: torch.Tensor, mu: float, eps: float = 1e-8):
    """One Dion step on an (m, n) gradient. Updates M and Q in place; returns (Δ, P, R).

    Works on Mᵀ when m < n, so that B = M or Mᵀ is tall (m' ≥ n') and Q is (n', r).
    ‖Δ‖_F² = r whenever B ≠ 0; a zero (or non-finite) B gives Δ = 0 and leaves Q as it was.
    """
    M.add_(G.to(M.dtype))
    transposed = M.shape[0] < M.shape[1]
    B = (M.T if transposed else M).float()
    if not torch.isfinite(B).all() or not B.any():  # dion's fix_all_zero_or_nan: no step
        return torch.zeros_like(M, dtype=torch.float32), None, None
    P = torch.linalg.qr(B @ Q.float(), mode="reduced").Q  # (m', r) orthonormal columns
    R = B.T @ P  # (n', r)
    applied = P @ R.T
    M.sub_(((1 - mu) * (applied.T if transposed else applied)).to(M.dtype))
    Qn = R / (R.norm(dim=0, keepdim=True) + eps)  # column-normalised: next step's warm start
    Q.copy_(Qn.to(Q.dtype))
    delta = P @ Qn.T
    return (delta.T if transposed else delta), P, R


class Dion(_MatrixOptimizer):
    def __init__(self, params, lr=0.02, mu=0.95, weight_decay=0.01, rank_fraction=1.0, rank_multiple_of=1,
                 eps=1e-8, state_dtype="fp32", seed=0):
        super().__init__(params, dict(lr=lr, mu=mu, weight_decay=weight_decay, rank_fraction=rank_fraction,
                                      rank_multiple_of=rank_multiple_of, eps=eps))
        self.state_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[state_dtype]
        self.generator = torch.Generator().manual_seed(seed)  # Q's init, reproducible per run

    def _init_state(self, p, g) -> dict:
        m, n = p.shape
        r = dion_rank(m, n, g["rank_fraction"], g["rank_multiple_of"])
        Q = torch.randn(min(m, n), r, generator=self.generator)  # not normalised, as in dion
        return {"momentum": torch.zeros_like(p, dtype=self.state_dtype),
                "Q": Q.to(device=p.device, dtype=self.state_dtype), "rank": r}

    def _direction(self, p, g, state) -> tuple[torch.Tensor, float]:
        if not state:
            state.update(self._init_state(p, g))
        delta, _, _ = dion_update(p.grad, state["momentum"], state["Q"], g["mu"], g["eps"])
        m, n = p.shape
        return delta, math.sqrt(m / n)  # spectral scale √(fan_out/fan_in), no max(1, ·)
