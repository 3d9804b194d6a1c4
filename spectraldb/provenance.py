"""Where a run came from: code version, package versions, host."""

from __future__ import annotations

import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import spectraldb

PACKAGES = ("torch", "duckdb", "ray", "numpy", "pydantic", "tokenizers")


def versions() -> dict[str, str]:
    out = {"specdb": spectraldb.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    """The commit of the specdb checkout, with '+dirty' when it has uncommitted changes."""
    root = Path(spectraldb.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    return {"git_commit": git_commit(), "versions": versions(), "host": socket.gethostname()}
