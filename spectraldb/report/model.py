"""What a report holds (tables, figures, sections) and how every cell is shown, in both renderings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Table:
    name: str                     # file name of its CSV, and its id on the page
    caption: str
    columns: list[str]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    missing: str | None = None    # one line: what would produce this section


@dataclass
class Report:
    store: str
    where: str | None
    version: str
    protocols: dict
    runs: dict
    generated: str
    sections: list[Section]


def cell(v) -> str:
    """One value as both renderings show it."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)
