"""Derived sizes and the strata rule: each defined once, for the spec, the model and the data."""

from __future__ import annotations

import math

import numpy as np

from contract.vocabulary import STRATUM_BOUNDS


def ffn_width(ffn_mult: float, d_model: int) -> int:
    """The FFN's hidden width D = round(ffn_mult · d_model): the x axis of every β."""
    return int(round(ffn_mult * d_model))


def is_measured(step: int, steps: int, every: int) -> bool:
    """Which steps are measured, wherever a run trains (specdb's loop, the HF and Lightning
    callbacks): the first, every `every`-th and the last. A predicate: O(1) memory however many
    steps a run has."""
    return step == 1 or step == steps or step % every == 0


def n_post_norm(norm: str, n_layer: int, postln_frac: float | None) -> int:
    """How many leading blocks are post-norm: ⌊n_layer · postln_frac⌋ with norm 'post' (None: all)."""
    if norm != "post":
        return 0
    return math.floor(n_layer * (1.0 if postln_frac is None else postln_frac))


def frequency_strata(counts: np.ndarray, bounds=STRATUM_BOUNDS) -> np.ndarray:
    """HEAD/MID/TAIL (0/1/2) per token id by frequency thresholds: the study's rule
    (docs/design.md §1).

    Sort the counts descending (s), cum = cumsum(s), h = #(cum ≤ 0.33·total), m = #(cum ≤
    0.67·total), h clamped to [1, V−1] and m to [h+1, V−1]; a type with count f ≥ s[h−1] is
    HEAD, f ≥ s[m−1] MID, else TAIL. Zero-count ids follow the same rule, and equal counts
    always share a stratum (the rule looks at the count, never at the id).
    """
    counts = np.asarray(counts, dtype=np.float64)
    V = counts.size
    s = np.sort(counts)[::-1]
    cum = np.cumsum(s)
    total = cum[-1] if V else 0.0
    h = int(np.count_nonzero(cum <= bounds[0] * total))
    m = int(np.count_nonzero(cum <= bounds[1] * total))
    h = min(max(h, 1), V - 1)
    m = min(max(m, h + 1), V - 1)
    return np.where(counts >= s[h - 1], 0, np.where(counts >= s[m - 1], 1, 2)).astype(np.int8)
