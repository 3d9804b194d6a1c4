"""How a report is built: each distinct predicate checked once, and its progress on a terminal."""

import os
from pathlib import Path

import pytest

from spectraldb import store
from tests.test_report import study  # noqa: F401 - the planted study, a fixture


def test_a_report_checks_each_distinct_predicate_once(study, monkeypatch):
    """A report asks every section's questions on one read-only connection: each distinct
    predicate (the user's, and the narrowed ones it builds from it) is checked once."""
    from spectraldb import predicates, report
    from spectraldb.selection import Selection

    checked = []
    real = predicates._check_where
    monkeypatch.setattr(predicates, "_check_where", lambda con, where: checked.append(where) or real(con, where))
    with store.connect(study, read_only=True) as con:
        report.build(con, Selection(where="seed = 0"), store=str(study))
    assert checked and sorted(checked) == sorted(set(checked)) and len(checked) <= 3, checked


@pytest.mark.slow  # two processes, one on a pseudo-terminal
def test_on_a_terminal_each_section_is_shown_as_it_is_built_and_cleared(study, tmp_path):
    import pty
    import subprocess
    import sys

    args = [sys.executable, "-m", "cli.main", "report", "-o", str(tmp_path / "r.html"), "--db", str(study)]
    root = Path(__file__).resolve().parent.parent
    master, terminal = pty.openpty()
    done = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal, cwd=root,
                          timeout=120)
    os.close(terminal)
    shown = b""
    while chunk := _read(master):
        shown += chunk
    os.close(master)
    text = shown.decode()
    assert done.returncode == 0, text
    assert "[1/9] β of rank against FFN width, per stratum" in text and "[9/9] " in text
    assert text.split("wrote ")[0].endswith("\r\x1b[2K")  # cleared before the last line
    piped = subprocess.run(args, capture_output=True, text=True, cwd=root, timeout=120)
    assert piped.returncode == 0 and "[1/9]" not in piped.stderr and "\x1b" not in piped.stderr


def _read(fd) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the terminal's other end is closed: all has been read
        return b""
