"""The driver's side of the store: one writer per store, and a spool so no trained run is lost.

* `WriterLock`: a `specdb run` holds `<store>.lock` (an advisory `flock`) for the whole sweep, so
  a second driver on the same store is refused with one line naming the first one's pid; the
  kernel drops the lock when the holder dies, so a SIGKILLed driver never blocks the next one.
* `Spool`: when a finished run cannot be committed (a reader holds the file longer than the
  writer waits, the disk is full, any commit error), its result is written durably to
  `<store>.spool/<run_id>.npz` (JSON metadata plus one array per spectrum, no pickle) and
  committed later: after each following run, at the end of the sweep, and first thing in the
  next `specdb run`. A spooled run counts as finished, so it is never trained again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np

from spectraldb.errors import SpecError, StoreError


class WriterLock:
    """Exclusive writer lock on `<store>.lock`; refuses (StoreError) when another process holds it."""

    def __init__(self, store_path):
        self.path = Path(f"{store_path}.lock")
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "unknown process"
                os.close(fd)
                raise StoreError(f"{str(self.path)[:-5]}: another `specdb run` is writing this store "
                                 f"({holder}); wait for it to finish, or use another --db") from None
            # the previous holder may have unlinked the file between our open and our lock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # unlink while still holding the lock (see __enter__)
            os.close(self.fd)
            self.fd = None


def check_store_name(store_path) -> None:
    """DuckDB reads a backslash in a file name as a folder separator: such a store would land
    elsewhere, or nowhere."""
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


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class Spool:
    """Finished results waiting for a commit, one durable file per run."""

    def __init__(self, store_path):
        self.dir = Path(f"{store_path}.spool")

    def pending(self) -> list[Path]:
        return sorted(self.dir.glob("*.npz")) if self.dir.is_dir() else []

    def put(self, run_id: str, config: dict, result: dict, provenance: dict, spec_name: str) -> Path:
        """Write one result atomically and durably (temporary file, fsync, rename, fsync folder)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        arrays, records = {}, []
        for i, rec in enumerate(result.get("spectra", [])):
            rec = dict(rec)
            if rec.get("eigenvalues") is not None:
                arrays[f"eig{i}"] = np.asarray(rec["eigenvalues"], dtype=np.float64)
                rec["eigenvalues"] = f"eig{i}"
            records.append(rec)
        meta = {"config": config, "result": {**result, "spectra": records}, "provenance": provenance,
                "spec_name": spec_name}
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=_jsonable).encode(), dtype=np.uint8)
        target = self.dir / f"{run_id}.npz"
        tmp = self.dir / f".{run_id}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
            raise
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return target

    @staticmethod
    def load(path: Path) -> dict:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            for rec in meta["result"]["spectra"]:
                if rec.get("eigenvalues") is not None:
                    rec["eigenvalues"] = z[rec["eigenvalues"]]
        return meta

    def run_ids(self) -> set[str]:
        return {p.stem for p in self.pending()}

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()


def drain(spool: Spool, store_path, wait_s: float) -> tuple[int, list[str]]:
    """Commit every spooled result; returns (committed, one line per result still waiting)."""
    from spectraldb import store
    from spectraldb.spec import RunSpec

    committed, waiting = 0, []
    for path in spool.pending():
        try:
            entry = Spool.load(path)
            run = RunSpec.model_validate(entry["config"])
        except (OSError, ValueError, KeyError) as exc:
            waiting.append(f"{path.name}: unreadable ({exc})")
            continue
        try:
            store.write_run(store_path, run, entry["result"], entry["provenance"], entry["spec_name"],
                            wait_s=wait_s)
        except Exception as exc:  # noqa: BLE001 - any commit error leaves the result spooled
            waiting.append(f"{run.run_id}: {one_line(exc)}")
            continue
        spool.remove(path)
        committed += 1
    return committed, waiting


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
