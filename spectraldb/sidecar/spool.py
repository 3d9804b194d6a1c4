"""The spool: no trained run is lost when it cannot be committed.

When a finished run cannot be committed (a reader holds the file longer than the writer waits,
the disk is full, any commit error), its result is written durably to
`<store>.spool/<run_id>.npz` (JSON metadata plus one array per spectrum, no pickle) and committed
later: after each following run, at the end of the sweep, and first thing in the next
`specdb run`. A spooled run counts as finished, so it is never trained again.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from contract.records import RunResult
from contract.vocabulary import STATUSES
from spectraldb.errors import one_line, one_line_text
from spectraldb.sidecar.files import beside, read_regular, write_atomically


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


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

    def put(self, run_id: str, config: dict, result: RunResult, provenance: dict, spec_name: str,
            vocab_size: int | None = None) -> Path:
        """Write one result atomically and durably (exclusive temporary file, fsync, rename, fsync folder)."""
        if self.dir.is_symlink():
            raise OSError(f"{self.dir}: a symlink, refused")
        self.dir.mkdir(parents=True, exist_ok=True)
        arrays, records = {}, []
        plain = result.to_dict()
        for i, rec in enumerate(plain["spectra"]):
            if rec.get("eigenvalues") is not None:
                arrays[f"eig{i}"] = np.asarray(rec["eigenvalues"], dtype=np.float64)
                rec["eigenvalues"] = f"eig{i}"
            records.append(rec)
        meta = {"config": config, "result": {**plain, "spectra": records}, "provenance": provenance,
                "spec_name": spec_name, "vocab_size": vocab_size}
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=_jsonable).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        target = self.dir / f"{run_id}.npz"
        write_atomically(target, buffer.getvalue(), durable=True)
        return target

    @staticmethod
    def load(path: Path) -> dict:
        """The verified entry (metadata with eigenvalue arrays in place and `result` a RunResult),
        or Damaged(why)."""
        from spectraldb.spec.tracked import spec_of

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
            spec_id = spec_of(meta["config"]).run_id
        except Exception as exc:  # noqa: BLE001
            raise Damaged(f"its spec is not valid ({one_line(exc)})") from None
        if spec_id != path.stem:
            raise Damaged(f"holds run {spec_id[:40]} but is named {path.stem[:40]}")
        try:
            # entries spooled before the contract carried the vocabulary size inside the result
            meta.setdefault("vocab_size", meta["result"].get("vocab_size"))
            if not (meta["vocab_size"] is None or type(meta["vocab_size"]) is int):
                raise Damaged("metadata of the wrong shape (vocab_size)")
            meta["result"] = RunResult.from_dict(meta["result"])
        except Damaged:
            raise
        except Exception as exc:  # noqa: BLE001
            raise Damaged(f"not a run result ({type(exc).__name__}: {str(exc)[:120]})") from None
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
    from spectraldb.spec.tracked import spec_of

    committed, waiting = 0, []
    for path in spool.pending():
        try:
            entry = Spool.load(path)
        except Damaged as exc:
            moved = spool.quarantine(path, str(exc))
            if damaged is not None:
                damaged.append(f"{path.name}: {exc}; moved to {moved} and its run will be trained again")
            continue
        run = spec_of(entry["config"])
        try:
            store.write_run(store_path, run, entry["result"], entry["provenance"], entry["spec_name"],
                            vocab_size=entry["vocab_size"], wait_s=wait_s)
        except Exception as exc:  # noqa: BLE001 - any commit error leaves the result spooled
            waiting.append(f"{run.run_id}: {one_line(exc)}")
            continue
        spool.remove(path)
        committed += 1
    return committed, waiting
