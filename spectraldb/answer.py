"""What every read returns: rows, notes, and the fits behind them; as Arrow or pandas on request."""

from __future__ import annotations

from dataclasses import dataclass, field

from spectraldb.errors import MissingPackage
from spectraldb.fits import GroupFit


@dataclass
class Answer:
    """A question's rows (what `specdb query … --format json` prints), its notes, how many diverged
    runs the selection left out, and the group fits behind the rows (β verbs)."""
    rows: list[dict]
    notes: list[str] = field(default_factory=list)
    excluded: int = 0
    groups: list[GroupFit] = field(default_factory=list)
    fields: list[str] | None = None  # the column names when known without rows (an empty table)

    @property
    def columns(self) -> list[str]:
        return list(self.fields) if self.fields is not None else list(dict.fromkeys(k for r in self.rows for k in r))

    def all_notes(self) -> list[str]:
        """The notes, and the line on diverged runs left out (as the CLI prints them)."""
        n = self.excluded
        return [*self.notes, *([f"excluded {n} diverged run{'s' if n > 1 else ''} (--include-diverged to keep them)"]
                               if n else [])]

    def to_arrow(self):
        """The rows as a pyarrow Table (one column per field, in order; missing values null)."""
        import pyarrow as pa

        return pa.table({c: [r.get(c) for r in self.rows] for c in self.columns})

    def to_pandas(self):
        """The rows as a pandas DataFrame (needs pandas)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise MissingPackage("to_pandas needs the pandas package: pip install pandas (or use to_arrow)") from None
        return self.to_arrow().to_pandas()
