"""Optimizers of the study (OPTIMIZERS.md): pure update functions plus thin Optimizer classes.

AdamW comes from torch.optim. Muon runs on the hidden 2-D block matrices only; the embedding
and the LM head go to Lion (head lr divided by √d_model), routed by name, never by ndim.
"""

from __future__ import annotations

import math
from typing import Iterable

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


def lion_update(grad, exp_avg, beta1: float, beta2: float) -> torch.Tensor:
    """sign(β1·m + (1−β1)·g), then m ← β2·m + (1−β2)·g (dion's scalar_opts.lion_update)."""
    update = exp_avg.lerp(grad, 1 - beta1).sign_()
    exp_avg.lerp_(grad, 1 - beta2)
    return update


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01,
                 lr_scale="spectral", ns="dion_quintic5", ns_dtype="auto"):
        if ns not in NS_SCHEDULES:
            raise ValueError(f"unknown Newton–Schulz schedule {ns!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        lr_scale=lr_scale, ns=ns, ns_dtype=ns_dtype)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                grad = p.grad.float()
                u = muon_update(grad, state["momentum_buffer"], g["momentum"], g["nesterov"], g["ns"],
                                ns_dtype(g["ns_dtype"], p.device))
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-g["lr"] * lr_scale(p.shape, g["lr_scale"]))
        return loss


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.95, 0.98), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for g in self.param_groups:
            beta1, beta2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                u = lion_update(p.grad, state["exp_avg"], beta1, beta2)
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.add_(u, alpha=-g["lr"])
        return loss


def route_parameters(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Split parameters by name into matrix / embedding / head / other (OPTIMIZERS §2.1).

    Every parameter lands in exactly one group; asserted.
    """
    groups: dict[str, list] = {"matrix": [], "embedding": [], "head": [], "other": []}
    for name, p in model.named_parameters():
        if name.startswith("lm_head."):
            groups["head"].append((name, p))
        elif name.startswith("transformer.wte.") or name.startswith("transformer.wpe."):
            groups["embedding"].append((name, p))
        elif name.startswith("transformer.h.") and p.ndim == 2:
            groups["matrix"].append((name, p))
        else:
            groups["other"].append((name, p))
    seen = [id(p) for ps in groups.values() for _, p in ps]
    all_ids = [id(p) for p in model.parameters()]
    assert sorted(seen) == sorted(all_ids) and len(set(seen)) == len(seen), \
        "every parameter must belong to exactly one optimizer group"
    return groups


def _params(pairs) -> list:
    return [p for _, p in pairs]


def build_optimizers(model: torch.nn.Module, spec: dict) -> list[torch.optim.Optimizer]:
    """Optimizers for a resolved optimizer spec (a dict with `name` and its hyperparameters)."""
    groups = route_parameters(model)
    name = spec["name"]
    d_model = model.cfg.d_model
    if name == "adamw":
        decay = groups["matrix"]
        no_decay = groups["embedding"] + groups["head"] + groups["other"]
        pg = [{"params": _params(decay), "weight_decay": spec["weight_decay"]},
              {"params": _params(no_decay), "weight_decay": 0.0}]
        return [torch.optim.AdamW([g for g in pg if g["params"]], lr=spec["lr"],
                                  betas=tuple(spec["betas"]), eps=spec["eps"])]
    if name == "muon":
        muon = Muon(_params(groups["matrix"]), lr=spec["lr"], momentum=spec["momentum"],
                    nesterov=spec["nesterov"], weight_decay=spec["weight_decay"],
                    lr_scale=spec["lr_scale"], ns=spec["ns"], ns_dtype=spec.get("ns_dtype", "auto"))
        scalar_lr = spec.get("scalar_lr") or spec["lr"]
        pg = [{"params": _params(groups["embedding"] + groups["other"]), "lr": scalar_lr},
              {"params": _params(groups["head"]), "lr": scalar_lr / math.sqrt(d_model)}]
        lion = Lion([g for g in pg if g["params"]], lr=scalar_lr, betas=tuple(spec["lion_betas"]),
                    weight_decay=0.0)
        return [muon, lion]
    raise ValueError(f"unknown optimizer {name!r}")


def lr_multiplier(step: int, total: int, warmup: int = 0, warmdown: float = 0.2) -> float:
    """Warm-up (optional), constant, then linear decay to 0 over the last `warmdown` of steps.

    `step` counts from 1; the multiplier applies to that step's update.
    """
    if warmup and step <= warmup:
        return step / warmup
    decay_start = total - int(round(warmdown * total))
    if step <= decay_start or total == decay_start:
        return 1.0
    return max(0.0, (total - step) / (total - decay_start))


def set_lr(optimizers: Iterable[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"] * multiplier
