"""What a measurement's accumulators cost in memory, and how they are split into passes.

Every accumulator (layer × site × stratum part) is a float64 D×D centred scatter and a mean. When
all of a model's do not fit the budget, the measurement runs in passes over the same tokens, each
pass a group of (layer, site) units holding every part that unit needs; each accumulator sees the
same chunks in the same order in any pass, so the spectra are those of one pass, bitwise.
The plan is pure arithmetic: `specdb plan` prints it, the probe follows it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

BATCH_BYTES = 1 << 30  # the most one stacked eigvalsh batch copies (on the device that holds it)
DEFAULT_SHARE = 0.5    # the default budget: this share of the device's memory
PARTS = 4              # head, mid, tail and the rest: the positions that count toward `all` only
MiB, GiB = 1 << 20, 1 << 30
UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": MiB,
         "g": 1000**3, "gb": 1000**3, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}
MAX_BYTES = 1 << 60


class MemoryBudgetError(ValueError):
    """A single layer × site does not fit the budget: one line with the numbers."""


def accumulator_bytes(dim: int) -> int:
    """One accumulator: the D×D float64 scatter and the D-vector mean."""
    return 8 * (dim * dim + dim)


def parts(strata) -> int:
    """Accumulators one (layer, site) holds: the pooled `all` is the merge of all four parts."""
    strata = set(strata)
    return PARTS if "all" in strata else len(strata)


def unit_bytes(dim: int, strata) -> int:
    """One (layer, site) at its peak: its parts, plus the merged `all` while it is decomposed."""
    return (parts(strata) + ("all" in set(strata))) * accumulator_bytes(dim)


def decompose_bytes(dim: int, spectra: int) -> int:
    """The eigensolver's working set: a stacked batch (BATCH_BYTES, or one matrix at the least)
    and the solver's own copy of it."""
    one = 8 * dim * dim
    return 2 * min(spectra, max(1, BATCH_BYTES // one)) * one if spectra else 0


@dataclass(frozen=True)
class MemoryPlan:
    n_passes: int
    peak: int                   # bytes of the largest pass
    whole: int                  # bytes of one pass holding every unit
    budget: int
    passes: tuple[tuple, ...] = ()  # each pass: the (layer, site) keys measured together, in order

    def part_of(self, key) -> int:
        for i, keys in enumerate(self.passes):
            if key in keys:
                return i
        raise KeyError(key)


def pass_bytes(dims: list[int], strata) -> int:
    """A pass of units of these widths: their accumulators and the largest batch of spectra."""
    n = len(set(strata))
    return sum(unit_bytes(d, strata) for d in dims) + max((decompose_bytes(d, n * dims.count(d)) for d in dims),
                                                           default=0)


def uniform_pass_bytes(dim: int, units: int, strata) -> int:
    """`pass_bytes` of `units` units of one width, without listing them."""
    return units * unit_bytes(dim, strata) + decompose_bytes(dim, len(set(strata)) * units)


def _refuse(dim: int, strata, budget: int) -> MemoryBudgetError:
    return MemoryBudgetError(
        f"measure.memory: one layer × site of width {dim} needs {fmt_bytes(uniform_pass_bytes(dim, 1, strata))} "
        f"({parts(strata)} accumulators of {fmt_bytes(accumulator_bytes(dim))} and the eigensolver's copy), over the "
        f"budget of {fmt_bytes(budget)}; raise measure.memory or measure fewer strata")


def uniform_plan(n_units: int, dim: int, strata, budget: int) -> MemoryPlan:
    """The plan of `n_units` units of one width (every layer of specdb's GPT and of the usual
    checkpoint): the passes hold the most units that fit, in order, the last one the rest. Pure
    arithmetic, so a spec of a billion layers is planned at once."""
    if uniform_pass_bytes(dim, 1, strata) > budget:
        raise _refuse(dim, strata, budget)
    low, high = 1, max(1, n_units)  # the most units a pass holds (pass bytes grow with units)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if uniform_pass_bytes(dim, mid, strata) <= budget else (low, mid - 1)
    n_passes = -(-n_units // low)
    return MemoryPlan(n_passes, uniform_pass_bytes(dim, min(low, n_units), strata),
                      uniform_pass_bytes(dim, n_units, strata), budget)


def plan_passes(units: list[tuple[object, int]], strata, budget: int) -> MemoryPlan:
    """Units (key, width) in measuring order, packed greedily into passes of at most `budget`
    bytes. Raises MemoryBudgetError when one unit alone exceeds it."""
    passes, current, dims = [], [], []
    for key, dim in units:
        if pass_bytes([dim], strata) > budget:
            raise _refuse(dim, strata, budget)
        if current and pass_bytes(dims + [dim], strata) > budget:
            passes.append(tuple(current))
            current, dims = [], []
        current.append(key)
        dims.append(dim)
    if current:
        passes.append(tuple(current))
    all_dims = [d for _, d in units]
    peak = max((pass_bytes([d for k, d in units if k in p], strata) for p in passes), default=0)
    return MemoryPlan(len(passes), peak, pass_bytes(all_dims, strata), budget, tuple(passes))


def parse_bytes(value) -> int:
    """`512MiB`, `2 GiB`, `1.5GB`, `300M` or a whole number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB, 8GiB or a number of bytes")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).lower() not in UNITS:
            raise ValueError(f"expected a size such as 512MiB, 8GiB or a number of bytes, got {str(value)[:40]!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * UNITS[unit]
    if not 1 <= size <= MAX_BYTES:  # also a float that overflowed to inf
        raise ValueError(f"a size from 1 byte to 1 EiB, got {str(value)[:40]!r}")
    return int(size)


def fmt_bytes(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:,.2f} GiB"
    return f"{n / MiB:,.1f} MiB" if n >= MiB else f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n} bytes"


def machine_memory() -> int:
    """Physical memory of this machine, or the cgroup's limit if that is smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return total


def default_budget(device_bytes: int | None = None) -> int:
    """DEFAULT_SHARE of the device's memory (this machine's, for a CPU)."""
    return int(DEFAULT_SHARE * (machine_memory() if device_bytes is None else device_bytes))
