"""Rows out: a table on a terminal (plain when piped), or json / csv / markdown."""

from __future__ import annotations

import csv
import itertools
import json
import math
import sys
import unicodedata

FORMATS = ("table", "json", "csv", "markdown")
TABLE_ROWS = 10_000  # a table (or markdown) is laid out in memory; csv and json stream any number of rows


def printable(text) -> str:
    """Text for a terminal: control, zero-width and bidirectional characters (which a label in an
    older store may hold) shown as escapes, so they cannot clear the screen or fake a line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() and unicodedata.category(c) != "Cf" else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return printable(v)


def render_stream(columns: list[str], tuples, fmt: str, stream=None) -> str | None:
    """Rows (tuples in column order) written as they come: csv and json stream in constant memory,
    markdown too; a table needs widths, so it holds at most TABLE_ROWS rows. Returns a note
    when rows were left out."""
    stream = stream or sys.stdout
    if fmt == "csv":
        w = csv.writer(stream, lineterminator="\n")
        w.writerow(columns)
        for t in tuples:
            w.writerow(["" if v is None else v for v in t])
        return None
    if fmt == "json":
        stream.write("[")
        for i, t in enumerate(tuples):
            stream.write(("," if i else "") + "\n  " + json.dumps(dict(zip(columns, t)), default=str))
        stream.write("\n]\n")
        return None
    if fmt == "markdown":
        stream.write("| " + " | ".join(printable(c) for c in columns) + " |\n")
        stream.write("|" + "|".join("---" for _ in columns) + "|\n")
        for t in tuples:
            stream.write("| " + " | ".join(_cell(v).replace("|", "\\|") for v in t) + " |\n")
        return None
    head = list(itertools.islice(tuples, TABLE_ROWS + 1))
    render([dict(zip(columns, t)) for t in head[:TABLE_ROWS]], fmt, columns, stream)
    if len(head) > TABLE_ROWS:
        return f"table cut at {TABLE_ROWS} rows; --format csv or json prints every row"
    return None


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
        from rich.markup import escape
        from rich.table import Table

        t = Table(*(escape(printable(c)) for c in columns))
        for r in rows:
            t.add_row(*(escape(_cell(r.get(c))) for c in columns))
        Console(file=stream).print(t)
    else:
        cells = [[printable(c) for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        for row in cells:
            stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
