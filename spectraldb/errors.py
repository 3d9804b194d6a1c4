"""Errors the CLI turns into one line and an exit code."""


class SpecError(ValueError):
    """Bad input (spec, override, store path): one line, exit code 2, nothing written."""


class StoreError(RuntimeError):
    """The store cannot be opened or is newer than this program."""


class StoreLocked(StoreError):
    """Another process held the store for longer than we were willing to wait."""
