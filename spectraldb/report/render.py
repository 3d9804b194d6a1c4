"""A report rendered: one self-contained HTML page (inline CSS, figures as PNG data URIs, no
script: it opens offline) or a Markdown folder (report.md, one PNG per figure, one CSV per table).
Both render every cell with `cell()`, so their tables agree; HTML cells also carry the full value."""

from __future__ import annotations

import base64
import csv
import html
import os
import re
import tempfile
from pathlib import Path

from spectraldb.report.model import Report, cell


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f4f4f4}td{text-align:right}td.text{text-align:left}caption{text-align:left;font-weight:600}
.missing{color:#8a5a00}.note{color:#555;font-size:12px}img{max-width:100%}"""


def _id(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "_", name.lower())


def to_html(report: Report) -> str:
    e = html.escape
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
           "style-src 'unsafe-inline'\">", f"<title>specdb report — {e(report.store)}</title>",
           f"<style>{CSS}</style></head><body>", "<h1>specdb report</h1>", "<ul class='meta'>"]
    for key, value in _meta(report):
        out.append(f"<li><b>{e(key)}</b>: {e(value)}</li>")
    out.append("</ul>")
    for section in report.sections:
        out.append(f"<section><h2>{e(section.title)}</h2><p>{e(section.text)}</p>")
        if section.missing:
            out.append(f"<p class='missing'>Not in this store: {e(section.missing)}</p>")
        for t in section.tables:
            out.append(f"<table id='{_id(t.name)}'><caption>{e(t.caption)}</caption><tr>"
                       + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr>")
            for r in t.rows:
                out.append("<tr>" + "".join(
                    f"<td class='{'text' if isinstance(r.get(c), str) else 'num'}' data-value='{e(repr(r.get(c)))}'>"
                    f"{e(cell(r.get(c)))}</td>" for c in t.columns) + "</tr>")
            out.append("</table>")
            out += [f"<p class='note'>{e(n)}</p>" for n in t.notes]
        for f in section.figures:
            data = base64.b64encode(f.png).decode()
            out.append(f"<figure><img alt='{e(f.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{e(f.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _meta(report: Report) -> list[tuple[str, str]]:
    return [("store", report.store), ("selection", report.where or "every finished run"),
            ("specdb", report.version),
            ("protocols", ", ".join(f"{p} ({n} runs)" for p, n in report.protocols.items())),
            ("runs", ", ".join(f"{n} {s}" for s, n in report.runs.items())), ("generated", report.generated)]


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    out = ["# specdb report", ""] + [f"- **{k}**: {_md_cell(v)}" for k, v in _meta(report)] + [""]
    for section in report.sections:
        out += [f"## {section.title}", "", section.text, ""]
        if section.missing:
            out += [f"*Not in this store: {section.missing}*", ""]
        for t in section.tables:
            out += [f"**{_md_cell(t.caption)}** (`tables/{t.name}.csv`)", "",
                    "| " + " | ".join(_md_cell(c) for c in t.columns) + " |",
                    "|" + "|".join("---" for _ in t.columns) + "|"]
            out += ["| " + " | ".join(_md_cell(cell(r.get(c))) for c in t.columns) + " |" for r in t.rows]
            out += [""] + [f"> {_md_cell(n)}" for n in t.notes] + ([""] if t.notes else [])
        for f in section.figures:
            out += [f"![{_md_cell(f.caption)}](figures/{f.name}.png)", ""]
    return "\n".join(out) + "\n"


def write_html(report: Report, path: str | Path) -> None:
    """One file, written whole (a temporary file in the same folder, renamed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_html(report))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a page to share: the permissions of any new file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_markdown(report: Report, folder: str | Path) -> None:
    """report.md with figures/NAME.png and tables/NAME.csv beside it."""
    folder = Path(folder)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    (folder / "tables").mkdir(exist_ok=True)
    for section in report.sections:
        for f in section.figures:
            (folder / "figures" / f"{f.name}.png").write_bytes(f.png)
        for t in section.tables:
            with open(folder / "tables" / f"{t.name}.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(t.columns)
                w.writerows([["" if r.get(c) is None else r.get(c) for c in t.columns] for r in t.rows])
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
