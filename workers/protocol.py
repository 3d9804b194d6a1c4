"""The measurement protocol: a number that changes whenever what a run measures changes.

Every run stores the protocol it was measured under (`runs.protocol`), and the number is part
of the run id, so a store keeps runs of an older protocol beside new ones and the verbs never
pool them into one fit silently (docs/design.md §5).

1. specdb 0.1: strata by where a type's cumulative mass starts (ties broken by id);
   `train_batch` measured after the step's update on the whole batch; LR decay on the 1-based
   step (the last update at lr 0); `last_k` 3 by default.
2. The study's protocol: strata by frequency thresholds (equal counts share a stratum);
   `train_batch` measured before the update, capped at `measure.tokens`; LR decay on the
   0-based iteration; `last_k` 5, each layer's last K measured values.
"""

PROTOCOL = 2
