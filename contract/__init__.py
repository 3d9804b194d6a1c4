"""The worker↔driver contract: what both sides of specdb agree on, and nothing else.

A leaf package: it imports only numpy and the standard library, and both `spectraldb` (the
driver, store and reads) and `workers` (training and measurement) import it; they never import
each other, except the driver's executor, which ships worker code (docs/design.md, "Parts").

- `contract.vocabulary`: the protocol number and every shared name (sites, strata, metrics,
  statuses, factors, the default store);
- `contract.records`: the result a worker hands the driver, as dataclasses;
- `contract.metrics`: the spectral metrics of one spectrum (the one definition of each);
- `contract.sizes`: derived sizes (`ffn_width`, `n_post_norm`) and the strata rule.
"""
