"""Adapters that measure a model trained by another framework into a specdb store.

They join the two sides — `workers.probe` measures, `spectraldb.track` stores — so they live
apart from both (docs/design.md, "Parts"): `integrations.hf` (an HF `TrainerCallback`) and
`integrations.lightning` (a Lightning `Callback`). Each needs its framework installed.
"""
