"""One writer per store: `specdb run` holds `<store>.lock` (an advisory `flock`) for the whole sweep,
so a second driver on the same store is refused with one line naming the first one's pid; the
kernel drops the lock when the holder dies, so a SIGKILLed driver never blocks the next one."""

from __future__ import annotations

import errno
import os
import socket
import time

from spectraldb.errors import StoreError, one_line_text
from spectraldb.sidecar.files import NOFOLLOW, beside


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
