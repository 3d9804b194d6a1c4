"""The progress file beside a store (`<store>.progress.json`): the running driver mirrors its runs in
flight there; `specdb status` and the service read it back, checked."""

from __future__ import annotations

import time


class Throttle:
    """Calls through at most every `interval` seconds (and always on the last step)."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.last = interval, 0.0

    def ready(self, step: int, steps: int) -> bool:
        now = time.monotonic()
        if step == steps or now - self.last >= self.interval:
            self.last = now
            return True
        return False


class SidecarReporter:
    """Wraps a reporter and mirrors the runs in flight to `<store>.progress.json`, so that
    `specdb status` in another terminal can show them. Written atomically (an exclusively created
    temporary file, never through a symlink), at most once a second."""

    def __init__(self, inner, store_path):
        import os

        from spectraldb.sidecar.files import beside

        self.inner = inner
        self.path = beside(store_path, ".progress.json")
        self.runs: dict[str, dict] = {}
        self.pid = os.getpid()
        self.throttle = Throttle(1.0)

    def _write(self, force: bool = False) -> None:
        import json

        from spectraldb.sidecar.files import write_atomically

        if not force and not self.throttle.ready(0, 1):
            return
        try:
            write_atomically(self.path, json.dumps({"pid": self.pid, "updated": time.time(), "runs": self.runs}).encode())
        except OSError:  # best effort: a full disk must not stop a sweep over a progress display
            pass

    def start(self, total: int, skipped: int) -> None:
        self.inner.start(total, skipped)
        self._write(force=True)

    def step(self, run_id: str, label: str, step: int, steps: int) -> None:
        self.inner.step(run_id, label, step, steps)
        self.runs[run_id] = {"label": label, "step": step, "steps": steps}
        self._write()

    def finish(self, run_id: str, label: str, status: str, seconds: float, detail: str = "") -> None:
        self.inner.finish(run_id, label, status, seconds, detail)
        self.runs.pop(run_id, None)
        self._write(force=True)

    def note(self, text: str) -> None:
        self.inner.note(text)

    def close(self) -> None:
        self.inner.close()
        if not self.path.is_symlink():
            self.path.unlink(missing_ok=True)


SIDECAR_BYTES = 1 << 20


def read_sidecar(store_path) -> tuple[dict, str | None]:
    """(runs in flight, note): the live driver's progress file, checked. A progress file that is
    not a regular file, not JSON of the right shape, or not written by the process that holds the
    store's writer lock (a stale file, a pid of 1 or -1) is ignored with a one-line note."""
    import json

    from spectraldb.sidecar.files import beside, read_regular
    from spectraldb.sidecar.lock import writer_pid

    path = beside(store_path, ".progress.json")
    if not path.exists() and not path.is_symlink():
        return {}, None
    ignored = f"ignored {path.name}"
    try:
        data = json.loads(read_regular(path, SIDECAR_BYTES))
    except (OSError, ValueError, RecursionError) as exc:
        return {}, f"{ignored}: not a readable progress file ({type(exc).__name__})"
    runs = data.get("runs") if isinstance(data, dict) else None
    pid = data.get("pid") if isinstance(data, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(runs, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("label"), str)
            and all(isinstance(v.get(x), int) and not isinstance(v.get(x), bool) for x in ("step", "steps"))
            for k, v in runs.items()):
        return {}, f"{ignored}: not of the expected shape"
    holder = writer_pid(store_path)
    if holder is None or holder != pid:
        return {}, f"{ignored}: stale (no running `specdb run` with pid {pid} holds this store)"
    return {k: {"label": v["label"], "step": v["step"], "steps": v["steps"]} for k, v in runs.items()}, None
