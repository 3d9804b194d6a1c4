"""Optimizers of the study (docs/design.md §2), their parameter routing and the LR schedule.

AdamW comes from torch.optim. Muon, NorMuon and Dion (workers.muon, workers.dion) run on the
hidden 2-D block matrices only; the embedding and the LM head go to Lion (head lr divided by
√d_model), routed by name, never by ndim.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from contract.config import AdamWConfig, DionConfig, MuonConfig, NorMuonConfig, OptimizerConfig
from workers.dion import Dion, dion_rank, dion_update  # noqa: F401  (re-exported)
from workers.muon import (NS_SCHEDULES, Muon, NorMuon, lr_scale, muon_update,  # noqa: F401
                          normuon_normalize, orthogonalize)


def lion_update(grad, exp_avg, beta1: float, beta2: float) -> torch.Tensor:
    """sign(β1·m + (1−β1)·g), then m ← β2·m + (1−β2)·g (dion's scalar_opts.lion_update)."""
    update = exp_avg.lerp(grad, 1 - beta1).sign_()
    exp_avg.lerp_(grad, 1 - beta2)
    return update


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


def build_optimizers(model: torch.nn.Module, spec: OptimizerConfig) -> list[torch.optim.Optimizer]:
    """Optimizers for a run's typed optimizer config (contract/config.py)."""
    groups = route_parameters(model)
    d_model = model.cfg.d_model
    if isinstance(spec, AdamWConfig):
        decay = groups["matrix"]
        no_decay = groups["embedding"] + groups["head"] + groups["other"]
        pg = [{"params": _params(decay), "weight_decay": spec.weight_decay},
              {"params": _params(no_decay), "weight_decay": 0.0}]
        return [torch.optim.AdamW([g for g in pg if g["params"]], lr=spec.lr, betas=spec.betas, eps=spec.eps)]
    matrices = _params(groups["matrix"])
    common = dict(lr=spec.lr, weight_decay=spec.weight_decay)
    if isinstance(spec, DionConfig):
        matrix_opt = Dion(matrices, mu=spec.mu, rank_fraction=spec.rank_fraction,
                          rank_multiple_of=spec.rank_multiple_of, eps=spec.eps, state_dtype=spec.state_dtype,
                          seed=torch.initial_seed(), **common)
    elif isinstance(spec, MuonConfig):
        muon_args = dict(momentum=spec.momentum, nesterov=spec.nesterov, lr_scale=spec.lr_scale, ns=spec.ns,
                         ns_dtype=spec.ns_dtype, **common)
        matrix_opt = NorMuon(matrices, beta2=spec.beta2, eps=spec.eps, mode=spec.mode, **muon_args) \
            if isinstance(spec, NorMuonConfig) else Muon(matrices, **muon_args)
    else:
        raise ValueError(f"unknown optimizer {type(spec).__name__}")
    pg = [{"params": _params(groups["embedding"] + groups["other"]), "lr": spec.scalar_lr},
          {"params": _params(groups["head"]), "lr": spec.scalar_lr / math.sqrt(d_model)}]
    lion = Lion([g for g in pg if g["params"]], lr=spec.scalar_lr, betas=spec.lion_betas, weight_decay=0.0)
    return [matrix_opt, lion]


def lr_multiplier(step: int, total: int, warmup: int = 0, warmdown: float = 0.2) -> float:
    """Warm-up (optional), constant, then linear decay towards 0 over the last `warmdown` of steps.

    `step` counts from 1 and the multiplier applies to that step's update. As in the study,
    the decay is computed on the 0-based iteration it = step − 1: (total − it)/cooldown, so
    the last update runs at 1/cooldown of the peak, not at 0 (protocol 2; protocol 1 used
    step itself and ended at 0).
    """
    if warmup and step <= warmup:
        return step / warmup
    cooldown = int(round(warmdown * total))
    it = step - 1
    if it < total - cooldown or cooldown == 0:
        return 1.0
    return max(0.0, (total - it) / cooldown)


def set_lr(optimizers: Iterable[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"] * multiplier
