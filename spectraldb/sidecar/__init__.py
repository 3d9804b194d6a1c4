"""The files beside a store, shared by every process that touches it — the driver (`specdb run`,
`measure`, `ingest`), a tracker finishing a run, `specdb status` and the service: the writer lock
(`lock.py`), the spool of finished runs waiting for the store (`spool.py`), the progress file
(`progress.py`) and how each is opened safely (`files.py`).
"""
