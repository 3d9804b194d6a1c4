"""One vocabulary for every part of specdb: the protocol, sites, strata, metrics, statuses, factors.

The measurement protocol is a number that changes whenever what a run measures changes. Every
run stores the protocol it was measured under (`runs.protocol`), and the number is part of the
run id, so a store keeps runs of an older protocol beside new ones and the verbs never pool them
into one fit silently (docs/design.md §5).

1. specdb 0.1: strata by where a type's cumulative mass starts (ties broken by id);
   `train_batch` measured after the step's update on the whole batch; LR decay on the 1-based
   step (the last update at lr 0); `last_k` 3 by default.
2. The study's protocol: strata by frequency thresholds (equal counts share a stratum);
   `train_batch` measured before the update, capped at `measure.tokens`; LR decay on the
   0-based iteration; `last_k` 5, each layer's last K measured values.
3. The study's timing and token counts: the step-s spectrum is of the weights after s updates
   (on `train_batch`, the next batch, before update s+1; the last step after the last update),
   beside the validation loss of the same weights; `all` has its own token count
   (`measure.all_tokens`, every data-parallel rank's share) and is never skipped for want of
   tokens (`min_stratum_tokens` applies to the strata only).
"""

from __future__ import annotations

import math

PROTOCOL = 3

DEFAULT_STORE = "specdb.duckdb"

SITES = ("pre", "post")                         # c_fc's output, c_proj's input
MEASURED_STRATA = ("head", "mid", "tail")       # what a token's frequency puts it in
STRATA = ("all", *MEASURED_STRATA)              # 'all' merges the three
STRATUM_BOUNDS = (0.33, 0.67)                   # cumulative-mass thresholds of the strata rule

STATUSES = ("done", "diverged", "failed")       # a finished run, as the store holds it
FINISHED = ("done", "diverged")                 # never trained again; `failed` is, with --retry-failed
PLAN_STATUSES = ("new", "spooled", *STATUSES)   # a run of a spec, seen from the driver

RENYI_ALPHAS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, math.inf)


def alpha_name(alpha: float) -> str:
    """Column-safe name of a Rényi order: 0.5 → '0_5', 2.0 → '2', inf → 'inf'."""
    if math.isinf(alpha):
        return "inf"
    return f"{alpha:g}".replace(".", "_")


def alpha_label(alpha: float) -> str:
    """How a user names a Rényi order: 0.5 → '0.5', 2.0 → '2', inf → 'inf'."""
    return "inf" if math.isinf(alpha) else f"{alpha:g}"


# metric as a user names it → its column in `ranks` (and its name in `run_points.metric`)
METRICS = {"soft": "soft_rank", "hard": "hard_rank", "eee": "eee",
           **{f"renyi:{alpha_label(a)}": f"renyi_{alpha_name(a)}" for a in RENYI_ALPHAS}}
RANK_COLUMNS = ("soft_rank", "hard_rank", "spectral_entropy", *(f"renyi_{alpha_name(a)}" for a in RENYI_ALPHAS), "eee")
REINJECTION_COLUMNS = ("js_divergence", *(f"rho_{alpha_name(a)}" for a in RENYI_ALPHAS))

# The model's baseline architecture: the spec's defaults and the model's (one definition). A run
# id leaves these fields out of its hash while they hold these values (docs/design.md §5).
BASELINE_ARCHITECTURE = {"pos": "rope", "norm": "pre", "postln_frac": None, "activation": "relu2"}

# Where a run came from, how its FFN sites are defined, how its strata were pooled across ranks.
SOURCES = ("specdb", "tracked", "checkpoint")
SITE_DEFINITIONS = {False: "pre: first projection output; post: down-projection input",
                    True: "pre: gate_proj output; post: down_proj input (gated)"}
STRATA_SCOPES = ("global", "rank0_local")
# How a data-parallel run pools its measurement across ranks: `study` takes the strata from rank
# 0's share of the batch alone (the study's rule), `global` lets them reach every rank's share;
# `all` is always pooled over every rank (docs/design.md §2).
REDUCTIONS = ("study", "global")

# columns of `runs` a question may group by (--by) or compare across (delta --arch)
FACTORS = ("optimizer", "optimizer_name", "lr", "d_model", "n_layer", "n_head", "context", "vocab_size",
           "corpus", "steps", "batch_size", "measure_source", "pos", "norm", "postln_frac", "activation",
           "spec_name", "ffn_mult", "seed", "protocol")
ARCHITECTURE_FACTORS = ("n_head", "pos", "norm", "postln_frac", "activation", "n_layer", "d_model", "context")
