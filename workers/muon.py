"""Muon and NorMuon (docs/design.md §2): pure update functions plus thin Optimizer classes.

Both take only 2-D (out, in) matrices. Momentum is the EMA form of KellerJordan/torch; the
paper's sum form differs only by a scalar that Newton–Schulz normalises away.
"""

from __future__ import annotations

import math

import torch

# Odd quintic schedules p(σ) = aσ + bσ³ + cσ⁵, one (a, b, c) per Newton–Schulz step (§5).
NS_SCHEDULES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "keller": ((3.4445, -4.7750, 2.0315),) * 5,
    "dion_quintic5": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    "polar_express5": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
# (Frobenius safety factor, eps) used to normalise the input of each schedule.
NS_NORMALISATION = {"keller": (1.0, 1e-7), "dion_quintic5": (1.0, 1e-7), "polar_express5": (1.02, 1e-6)}


def orthogonalize(G: torch.Tensor, schedule: str = "dion_quintic5",
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate the polar factor UVᵀ of G (torch's op order: keller in bf16 is bitwise torch)."""
    assert G.ndim == 2, "orthogonalize needs a matrix"
    safety, eps = NS_NORMALISATION[schedule]
    X = G.to(dtype)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T  # iterate on the wide orientation: the Gram matrix is the small one
    if safety == 1.0:
        X = X.div(X.norm().clamp(min=eps))
    else:
        X = X.div(X.norm() * safety + eps)
    for a, b, c in NS_SCHEDULES[schedule]:
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if tall else X


def lr_scale(shape: torch.Size, mode: str) -> float:
    """Per-matrix lr factor for an (out, in) weight (OPTIMIZERS §2.2)."""
    fan_out, fan_in = shape
    if mode == "spectral":
        return math.sqrt(fan_out / fan_in)
    if mode == "keller":
        return math.sqrt(max(1.0, fan_out / fan_in))
    raise ValueError(f"unknown lr_scale {mode!r}")


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU and float32 on a CPU, where bf16 matmuls measured ~20× slower."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def muon_update(grad, buf, momentum: float, nesterov: bool, schedule: str,
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """EMA momentum (in place on buf) then orthogonalisation of the (Nesterov) direction."""
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if nesterov else buf
    return orthogonalize(update, schedule, dtype)


def normuon_normalize(O: torch.Tensor, v: torch.Tensor, beta2: float, eps: float,
                      mode: str = "preserve_norm") -> tuple[torch.Tensor, float]:
    """Per-row (output neuron) second-moment normalisation of an orthogonalised update.

    Updates v (m, 1) in place; returns (Ô, lr multiplier). `preserve_norm` rescales Ô to ‖O‖_F
    (official code, dion, the paper); `match_rms` returns the multiplier 0.2·√(mn)/‖Ô‖_F
    (NorMuon paper, Algorithm 1), to be used instead of the spectral lr scale.
    """
    O = O.float()
    v.lerp_(O.square().mean(dim=-1, keepdim=True), 1 - beta2)
    O_hat = O / (v.sqrt() + eps)
    if mode == "preserve_norm":
        return O_hat * (O.norm() / O_hat.norm().clamp(min=1e-30)), 1.0
    if mode == "match_rms":
        m, n = O.shape
        return O_hat, 0.2 * math.sqrt(m * n) / float(O_hat.norm().clamp(min=1e-30))
    raise ValueError(f"unknown NorMuon mode {mode!r}")


class _MatrixOptimizer(torch.optim.Optimizer):
    """2-D parameters only; a subclass supplies `_direction(p, group, state) → (update, lr factor)`
    and this applies decoupled weight decay and the step."""

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"{type(self).__name__} only takes 2-D parameters, got {tuple(p.shape)}")

    def _direction(self, p, g, state) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                u, scale = self._direction(p, g, self.state[p])
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-g["lr"] * scale)
        return loss


class Muon(_MatrixOptimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01,
                 lr_scale="spectral", ns="dion_quintic5", ns_dtype="auto"):
        if ns not in NS_SCHEDULES:
            raise ValueError(f"unknown Newton–Schulz schedule {ns!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      lr_scale=lr_scale, ns=ns, ns_dtype=ns_dtype))

    def _direction(self, p, g, state) -> tuple[torch.Tensor, float]:
        """The update direction and its lr factor (beyond lr)."""
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
        O = muon_update(p.grad.float(), state["momentum_buffer"], g["momentum"], g["nesterov"], g["ns"],
                        ns_dtype(g["ns_dtype"], p.device))
        return O, lr_scale(p.shape, g["lr_scale"])


class NorMuon(Muon):
    """Muon whose orthogonalised update is normalised per output neuron (arXiv 2510.05491)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01,
                 lr_scale="spectral", ns="dion_quintic5", ns_dtype="auto", beta2=0.95, eps=1e-8,
                 mode="preserve_norm"):
        super().__init__(params, lr, momentum, nesterov, weight_decay, lr_scale, ns, ns_dtype)
        for g in self.param_groups:
            g.update(beta2=beta2, eps=eps, mode=mode)

    def _direction(self, p, g, state):
        O, scale = super()._direction(p, g, state)
        if "v" not in state:
            state["v"] = torch.zeros(p.shape[0], 1, dtype=torch.float32, device=p.device)
        O_hat, factor = normuon_normalize(O, state["v"], g["beta2"], g["eps"], g["mode"])
        return O_hat, (factor if g["mode"] == "match_rms" else scale)
