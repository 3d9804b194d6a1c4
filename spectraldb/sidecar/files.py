"""The files beside a store (`.lock`, `.spool/`, `.progress.json`) opened as on a shared disk:
never through a symlink a neighbour planted, temporary names created exclusively, and named
after the store file itself, whatever path reached it.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from spectraldb.errors import SpecError

NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def beside(store_path, suffix: str) -> Path:
    """`<store><suffix>` for the store's real path: a store reached through a symlinked file or
    folder has one lock, one spool and one progress file."""
    return Path(f"{os.path.realpath(store_path)}{suffix}")


def write_atomically(target: Path, data: bytes, durable: bool = False) -> None:
    """Write `data` to a fresh, exclusively created temporary file beside `target` (never a symlink
    or someone else's file), then rename it over `target`."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(target.parent)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes (not a symlink, FIFO or device: those raise OSError at once),
    at most `max_bytes` of them (ValueError beyond)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW)
    try:
        import stat

        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name}: not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"{path.name}: {st.st_size:,} bytes, over {max_bytes:,}")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise ValueError(f"{path.name}: over {max_bytes:,} bytes")
        return data
    finally:
        os.close(fd)


SPECIAL_NAME = re.compile(r"^(:|[A-Za-z][A-Za-z0-9+.-]*:)")


def check_store_name(store_path) -> None:
    """A store is a file: DuckDB reads `:memory:`, `file:…`, `md:…` (any `word:` prefix) as
    something else, so training into them would fail at every commit. A backslash DuckDB reads as
    a folder separator: such a store would land elsewhere, or nowhere."""
    if SPECIAL_NAME.match(str(store_path)):
        raise SpecError(f"{store_path}: not a store file name (DuckDB reads ':memory:' and 'word:' prefixes "
                        "as special databases); name a file, e.g. ./results.duckdb")
    if "\\" in str(store_path):
        raise SpecError(f"{store_path}: a store path cannot contain a backslash (DuckDB reads it as a "
                        "folder separator)")


def check_store_folder(store_path) -> None:
    """A store whose folder is missing or read-only is refused before anything trains."""
    check_store_name(store_path)
    folder = Path(store_path).resolve().parent
    if not folder.is_dir():
        raise SpecError(f"{store_path}: folder {folder} does not exist (create it, or pass another --db)")
    try:  # a real probe: permission bits say nothing for root or on a read-only mount
        import tempfile

        with tempfile.TemporaryFile(dir=folder, prefix=".specdb-probe-"):
            pass
    except OSError as exc:
        raise SpecError(f"{store_path}: folder {folder} is not writable ({exc.strerror or exc}); the store, "
                        "its lock and its spool live there") from None
