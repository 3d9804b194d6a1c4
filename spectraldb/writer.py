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

import errno
import io
import json
import os
import re
import socket
import time
from pathlib import Path

import numpy as np

from spectraldb.errors import SpecError, StoreError
from spectraldb.files import NOFOLLOW, beside, read_regular, write_atomically


class WriterLock:
    """Exclusive writer lock on `<real store path>.lock`; refuses (StoreError) when another process
    holds it. The lock file is never opened through a symlink, and it is keyed on the store's real
    path, so a second driver reaching the same file by another path is refused too."""

    RETRY_S = 0.5  # `specdb status` probes the lock for an instant (writer_alive): not a holder

    def __init__(self, store_path):
        self.store = store_path
        self.path = beside(store_path, ".lock")
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)
            except OSError as exc:
                raise StoreError(f"{self.store}: cannot open its lock file {self.path.name} "
                                 f"({'a symlink: refused' if exc.errno == errno.ELOOP else exc.strerror or exc})") from None
            deadline = time.monotonic() + self.RETRY_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() < deadline:
                        time.sleep(0.02)
                        continue
                    holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "unknown process"
                    os.close(fd)
                    raise StoreError(f"{self.store}: another `specdb run` is writing this store "
                                     f"({one_line_text(holder)}); wait for it to finish, or use another --db") from None
            # the previous holder may have unlinked the file between our open and our lock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
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


def writer_pid(store_path) -> int | None:
    """The pid of the live `specdb run` holding the store's writer lock (None when none does):
    an instant's shared-lock probe, which the writer's own retry (WriterLock.RETRY_S) absorbs."""
    import fcntl

    path = beside(store_path, ".lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: a live writer
            text = os.read(fd, 512).decode("utf-8", "replace")
            word = text.split()[1] if text.startswith("pid ") and len(text.split()) > 1 else ""
            return int(word) if word.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def one_line_text(text: str) -> str:
    """Text from a file as one printable line (control characters escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(text.split()))[:200]


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


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


STATUSES = ("done", "diverged", "failed")
MAX_ENTRY_BYTES = 8 * 1024**3


class Damaged(ValueError):
    """A spool entry that failed its check: one line saying why."""


class Spool:
    """Finished results waiting for a commit, one durable file per run. An entry counts only once
    it is verified (`load`): a regular file, a readable archive, metadata of the right shape, and
    a run id that matches both its file name and its own spec. Others are moved to `damaged/`."""

    def __init__(self, store_path):
        self.dir = beside(store_path, ".spool")
        self.damaged_dir = self.dir / "damaged"

    def pending(self) -> list[Path]:
        if self.dir.is_symlink() or not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.npz") if not p.name.startswith("."))

    def put(self, run_id: str, config: dict, result: dict, provenance: dict, spec_name: str) -> Path:
        """Write one result atomically and durably (exclusive temporary file, fsync, rename, fsync folder)."""
        if self.dir.is_symlink():
            raise OSError(f"{self.dir}: a symlink, refused")
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
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        target = self.dir / f"{run_id}.npz"
        write_atomically(target, buffer.getvalue(), durable=True)
        return target

    @staticmethod
    def load(path: Path) -> dict:
        """The verified entry (metadata with eigenvalue arrays in place), or Damaged(why)."""
        from spectraldb.spec import RunSpec

        try:
            data = read_regular(path, MAX_ENTRY_BYTES)
        except (OSError, ValueError) as exc:
            raise Damaged(f"unreadable ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc})") from None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                _check_shape(meta)
                for rec in meta["result"]["spectra"]:
                    if rec.get("eigenvalues") is not None:
                        eig = z[rec["eigenvalues"]]
                        if eig.ndim != 1 or eig.dtype != np.float64:
                            raise Damaged(f"eigenvalues {rec['eigenvalues']}: not a float64 vector")
                        rec["eigenvalues"] = eig
        except Damaged:
            raise
        except RecursionError:
            raise Damaged("metadata nested too deeply") from None
        except Exception as exc:  # noqa: BLE001 - zip, CRC, JSON, missing keys: every way a file can be bad
            raise Damaged(f"not a readable spool entry ({type(exc).__name__}: {str(exc)[:120]})") from None
        try:
            spec_id = RunSpec.model_validate(meta["config"]).run_id
        except Exception as exc:  # noqa: BLE001
            raise Damaged(f"its spec is not valid ({one_line(exc)})") from None
        if spec_id != path.stem:
            raise Damaged(f"holds run {spec_id[:40]} but is named {path.stem[:40]}")
        return meta

    def scan(self) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
        """(run_id → verified entry, [(damaged entry, why)]); nothing is moved."""
        good, bad = {}, []
        for path in self.pending():
            try:
                self.load(path)
            except Damaged as exc:
                bad.append((path, str(exc)))
            else:
                good[path.stem] = path
        return good, bad

    def run_ids(self) -> set[str]:
        """Runs whose verified result waits here (a damaged entry's run is trained again)."""
        return set(self.scan()[0])

    def quarantine(self, path: Path, why: str) -> Path:
        """Move a damaged entry to `damaged/` with a `.why` file of one line."""
        self.damaged_dir.mkdir(exist_ok=True)
        target = self.damaged_dir / path.name
        n = 1
        while target.exists() or target.is_symlink():
            n += 1
            target = self.damaged_dir / f"{path.stem}.{n}{path.suffix}"
        os.replace(path, target)
        write_atomically(target.with_name(target.name + ".why"), (one_line_text(why) + "\n").encode())
        return target

    def damaged(self) -> list[Path]:
        if self.damaged_dir.is_symlink() or not self.damaged_dir.is_dir():
            return []
        return sorted(p for p in self.damaged_dir.iterdir() if not p.name.endswith(".why"))

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if self.dir.is_dir() and not any(self.dir.iterdir()):
            self.dir.rmdir()


def _check_shape(meta) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise Damaged(f"metadata of the wrong shape ({what})")

    need(isinstance(meta, dict), "not an object")
    need(isinstance(meta.get("config"), dict), "config")
    need(isinstance(meta.get("provenance", {}), dict), "provenance")
    need(isinstance(meta.get("spec_name", ""), str), "spec_name")
    res = meta.get("result")
    need(isinstance(res, dict), "result")
    need(res.get("status") in STATUSES, "result.status")
    need(isinstance(res.get("evals", []), list) and all(isinstance(e, dict) for e in res.get("evals", [])),
         "result.evals")
    spectra = res.get("spectra", [])
    need(isinstance(spectra, list) and all(isinstance(r, dict) for r in spectra), "result.spectra")
    for r in spectra:
        need(all(k in r for k in ("step", "layer", "site", "stratum", "n_tokens", "n_dim")), "a spectrum's keys")
        need(r.get("eigenvalues") is None or isinstance(r["eigenvalues"], str), "a spectrum's eigenvalues")


def drain(spool: Spool, store_path, wait_s: float, damaged: list | None = None) -> tuple[int, list[str]]:
    """Commit every verified spooled result; damaged entries are moved to `damaged/` (one line each
    appended to `damaged`, their runs trained again). Returns (committed, one line per result
    still waiting)."""
    from spectraldb import store
    from spectraldb.spec import RunSpec

    committed, waiting = 0, []
    for path in spool.pending():
        try:
            entry = Spool.load(path)
        except Damaged as exc:
            moved = spool.quarantine(path, str(exc))
            if damaged is not None:
                damaged.append(f"{path.name}: {exc}; moved to {moved} and its run will be trained again")
            continue
        run = RunSpec.model_validate(entry["config"])
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
