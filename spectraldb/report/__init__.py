"""The study assembled: every finding a store can answer, as one page (`specdb report`).

`build(con, selection, store=…)` asks the same library verbs the CLI and the service ask
(spectraldb.queries, spectraldb.plots, spectraldb.catalog) and returns a `Report`: sections of
tables and figures, or, where the store lacks the runs a section needs, one line saying which
spec or factor would produce them. `to_html` renders it as one self-contained page (inline CSS,
figures as PNG data URIs, no script: it opens offline); `write_markdown` as a folder (report.md,
one PNG per figure, one CSV per table). Both render every cell with `cell()`, so their tables
agree; HTML cells also carry the full value (`data-value`).
"""

from spectraldb.report.model import Figure, Report, Section, Table, cell  # noqa: F401 - the API
from spectraldb.report.render import to_html, to_markdown, write_html, write_markdown  # noqa: F401
from spectraldb.report.sections import SECTIONS, build, narrowed, shown_where  # noqa: F401
