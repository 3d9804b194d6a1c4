"""Rows out: a table on a terminal (plain when piped), or json / csv / markdown."""

from __future__ import annotations

import csv
import json
import math
import sys

FORMATS = ("table", "json", "csv", "markdown")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def render(rows: list[dict], fmt: str, columns: list[str] | None = None, stream=None) -> None:
    stream = stream or sys.stdout
    columns = columns or (list(rows[0]) if rows else [])
    if fmt == "json":
        stream.write(json.dumps(rows, indent=2, default=str) + "\n")
    elif fmt == "csv":
        w = csv.writer(stream, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    elif fmt == "markdown":
        stream.write("| " + " | ".join(columns) + " |\n")
        stream.write("|" + "|".join("---" for _ in columns) + "|\n")
        for r in rows:
            stream.write("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |\n")
    elif stream.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(*columns)
        for r in rows:
            t.add_row(*(_cell(r.get(c)) for c in columns))
        Console(file=stream).print(t)
    else:
        cells = [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        for row in cells:
            stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
