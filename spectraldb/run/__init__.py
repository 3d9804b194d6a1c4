"""The run side: the driver that trains a sweep and stores each finished run.

- `sweep`: plan (which runs are new) and the sweep loop;
- `executors`: inline and Ray — the only module that ships worker code;
- `sink`: where a finished run goes (store, else spool, else memory);
- `spool`: durable results waiting for a commit; `lock`: one writer per store;
- `preflight`: every check before training; `progress`: what a running sweep shows.
"""
