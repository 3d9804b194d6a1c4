"""`specdb run`, `plan` and `status`: the sweep and what the store holds of it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import DEFAULT_DB, DbOpt, FormatOpt, SetOpt, check_format, fail, need_extra, reader, translated
from cli.output import printable, render
from contract.vocabulary import PLAN_STATUSES, STATUSES


def _load(spec: Path, overrides: Optional[List[str]]):
    from spectraldb.spec import load_spec

    plan, _ = load_spec(spec, overrides or [])
    return plan


def run(spec: Path = typer.Argument(..., help="Spec file, e.g. experiments.yaml"),
        db: Optional[str] = DbOpt, set_: Optional[List[str]] = SetOpt,
        executor: str = typer.Option("ray", help="ray (local Ray instance, or --address) | inline"),
        address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local one)"),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="Also re-run runs stored as failed."),
        cache_dir: Optional[Path] = typer.Option(None, envvar="SPECDB_CACHE",
                                                 help="Tokenizer/dataset cache (default ~/.cache/specdb)"),
        max_in_flight: Optional[int] = typer.Option(None, "--max-in-flight", min=1,
                                                    help="Submit at most N runs to Ray at a time.")):
    """Train and measure every run the spec declares that the store does not hold yet.

    Example: specdb run experiments.yaml -S train.steps=100
    """
    from spectraldb.run.progress import reporter_for
    from spectraldb.run.sweep import EXECUTORS, run_sweep

    need_extra("run", "train")
    if executor not in EXECUTORS:
        fail(f"--executor: unknown executor {executor!r} (expected ray or inline)", 2)
    with translated():
        plan = _load(spec, set_)
        path = db or plan.store
        result = run_sweep(plan, path, executor=executor, address=address, retry_failed=retry_failed,
                           reporter=reporter_for(sys.stderr), cache_dir=cache_dir, max_in_flight=max_in_flight)
    _say_stored(result, spec, path, "runs", "finished run(s)", "`specdb run`")


def _say_stored(result, spec, path, noun: str, waiting: str, next_: str) -> None:
    """What `run` or `measure` stored, in the same words: exit 1 while finished results wait in the
    spool, 3 when a run failed or diverged."""
    for line in result.damaged:
        typer.echo(f"damaged spool entry {printable(line)}", err=True)
    if result.recovered:
        typer.echo(f"committed {result.recovered} finished run(s) from {path}.spool", err=True)
    if not result.statuses:
        typer.echo(f"nothing to do: all {result.total} {noun} of {spec} are already in {path}", err=True)
        return
    if result.waiting:
        fail(f"{len(result.waiting)} {waiting} could not be committed and wait in {path}.spool "
             f"(the next {next_} commits them; first: {result.waiting[0]})", 1)
    counts = {s: list(result.statuses.values()).count(s) for s in sorted(set(result.statuses.values()))}
    typer.echo(f"stored {len(result.statuses)} {noun} in {path} ({', '.join(f'{n} {s}' for s, n in counts.items())};"
               f" {result.skipped} already there)", err=True)
    if not result.ok:
        raise typer.Exit(3)


def plan(spec: Path = typer.Argument(..., help="Spec file"), db: Optional[str] = DbOpt,
         set_: Optional[List[str]] = SetOpt, fmt: str = FormatOpt,
         executor: str = typer.Option("ray", help="The executor `run` would use: ray | inline"),
         address: Optional[str] = typer.Option(None, help="Plan for `run --address` on a Ray cluster: this machine's "
                                               "memory, CPUs and GPUs are not checked (run checks the cluster's)."),
         cache_dir: Optional[Path] = typer.Option(None, envvar="SPECDB_CACHE",
                                                  help="Tokenizer/dataset cache (default ~/.cache/specdb)")):
    """List every run of a spec with its status in the store (new / spooled / done / diverged /
    failed) and totals, after every check `specdb run` makes before training (same message, exit 2)."""
    from spectraldb.run.sweep import check_plan, plan_rows

    check_format(fmt)
    from spectraldb.spec.checkpoints import is_checkpoints_spec

    if is_checkpoints_spec(spec):
        from spectraldb.run.measure import plan_rows as checkpoint_rows
        from spectraldb.spec.checkpoints import load_checkpoints

        with translated():
            cspec, runs = load_checkpoints(spec, set_ or [])
            rows = checkpoint_rows(cspec, runs, db or cspec.store)
        render(rows, fmt)
        typer.echo(f"{len(rows)} checkpoints: " + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                                                             for s in ("new", *STATUSES)), err=True)
        return
    with translated():
        p = _load(spec, set_)
        check_plan(p, db or p.store, executor, address, cache_dir)
        rows = plan_rows(p, db or p.store)
    render(rows, fmt)
    counts = {s: sum(r["status"] == s for r in rows) for s in PLAN_STATUSES}
    typer.echo(f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), err=True)
    _spool_notes(db or p.store)


def _spool_notes(db) -> None:
    """Damaged spool entries (now, and moved aside earlier): their runs are trained again."""
    from spectraldb.sidecar.spool import Spool

    spool = Spool(db)
    for path, why in spool.scan()[1]:
        typer.echo(f"damaged spool entry {printable(path.name)}: {printable(why)}; the next `specdb run` moves it to "
                   f"{spool.damaged_dir.name}/ and trains its run again", err=True)
    moved = spool.damaged()
    if moved:
        typer.echo(f"{len(moved)} damaged spool entr{'y' if len(moved) == 1 else 'ies'} kept in {spool.damaged_dir} "
                   "(each with a .why file); their runs were trained again", err=True)


def status(spec: Optional[Path] = typer.Argument(None, help="A spec: count its runs (new ones too) and use its store."),
           db: Optional[str] = DbOpt, fmt: str = FormatOpt,
           runs: bool = typer.Option(False, "--runs", help="One row per run instead of per status.")):
    """Runs by status with their size, failed/diverged runs with their error line, runs in
    flight with their step (from a running `specdb run` on the same store), the store's size.

    Examples: specdb status · specdb status experiments.yaml · specdb status --runs --format csv
    """
    from contract.vocabulary import PROTOCOL
    from spectraldb.sidecar.progress import read_sidecar
    from spectraldb.sidecar.spool import Spool

    check_format(fmt)
    if spec is not None:
        from spectraldb.run.sweep import plan_rows
        from spectraldb.spec.checkpoints import is_checkpoints_spec, load_checkpoints

        with translated():
            if is_checkpoints_spec(spec):  # `specdb measure`'s spec: its checkpoints' runs
                from spectraldb.run.measure import plan_rows as checkpoint_rows

                plan_, runs_ = load_checkpoints(spec)
                rows = checkpoint_rows(plan_, runs_, db or plan_.store)
            else:
                plan_ = _load(spec, [])
                rows = plan_rows(plan_, db or plan_.store)
        render([{"status": st, "runs": sum(r["status"] == st for r in rows)}
                for st in PLAN_STATUSES if any(r["status"] == st for r in rows)], fmt)
        typer.echo(f"{len(rows)} runs: " + ", ".join(f"{sum(r['status'] == st for r in rows)} {st}"
                                                    for st in PLAN_STATUSES), err=True)
        db = db or plan_.store
        if not Path(db).exists():
            return
    path = Path(db or DEFAULT_DB)
    with translated():
        with reader(str(path), verify=True) as store:
            table = store.run_sizes() if runs else store.status()
            unfinished = store.unfinished()
            protocols = store.protocols()
    if spec is None:
        render(table.rows, fmt, table.columns)
    typer.echo(f"store {path}: {path.stat().st_size / 1048576:.1f} MiB on disk", err=True)
    for number, n in protocols.items():
        if number != PROTOCOL:
            typer.echo(f"{n} run(s) measured under protocol {number} (this specdb measures protocol {PROTOCOL}): "
                       "kept, never fitted together with current runs; see docs/design.md", err=True)
    spooled = Spool(path).run_ids()
    if spooled:
        typer.echo(f"{len(spooled)} finished run(s) waiting in {Spool(path).dir} to be committed "
                   "(the next `specdb run` on this store commits them first)", err=True)
    _spool_notes(path)
    flight, note = read_sidecar(path)
    if note:
        typer.echo(printable(note), err=True)
    for rid, info in flight.items():
        typer.echo(printable(f"in flight {rid} {info['label']}: step {info['step']}/{info['steps']}"), err=True)
    for row in unfinished:
        last = (row["error"] or "").strip().splitlines()[-1:] or [""]
        what = [f"ffn_mult={row['ffn_mult']:g}" if row["ffn_mult"] is not None else "", row["checkpoint"] or ""]
        typer.echo(printable(" ".join(filter(None, [row["status"], row["run_id"], row["optimizer"], *what]))
                             + f": {last[0]}"), err=True)


def ingest(db: Optional[str] = DbOpt):
    """Commit the finished runs waiting in the store's spool: runs tracked from other training
    loops while a `specdb run` held the store, or a sweep's results it could not commit. Each is
    committed once; damaged entries are moved aside with a note.

    Example: specdb ingest --db results.duckdb
    """
    from spectraldb import store
    from spectraldb.sidecar.lock import WriterLock
    from spectraldb.sidecar.files import check_store_folder
    from spectraldb.sidecar.spool import Spool, drain

    path = db or DEFAULT_DB
    damaged: list[str] = []
    with translated():
        check_store_folder(path)
        with WriterLock(path):
            committed, waiting = drain(Spool(path), path, store.LOCK_WAIT_S, damaged)
    for line in damaged:
        typer.echo(f"damaged spool entry {printable(line)}", err=True)
    typer.echo(f"committed {committed} finished run(s) from {path}.spool", err=True)
    if waiting:
        fail(f"{len(waiting)} run(s) still wait in {path}.spool (first: {waiting[0]})", 1)


def measure(spec: Path = typer.Argument(..., help="A checkpoints spec, e.g. examples/checkpoints.yaml"),
            db: Optional[str] = DbOpt, set_: Optional[List[str]] = SetOpt,
            retry_failed: bool = typer.Option(False, "--retry-failed", help="Also measure checkpoints stored as failed."),
            executor: str = typer.Option("ray", help="ray: one Ray task per checkpoint, as many at once as the "
                                         "spec's resources allow | inline: one after another in this process"),
            address: Optional[str] = typer.Option(None, help="A Ray cluster's address (default: a local Ray instance)")):
    """Measure saved checkpoints (local HF model folders, or revisions already in the local HF
    cache: nothing downloads), each as a Ray task on its own resources (CUDA when the task has a
    GPU), each stored as a run: its FFN spectra on the spec's corpus tokenised with the model's own
    tokenizer, and its loss there. A checkpoint that cannot be loaded is stored as failed with one
    line; the others go on; a task whose process dies is retried (resources.max_retries).

    Examples: specdb measure examples/checkpoints.yaml · specdb measure suite.yaml --address auto
    """
    from spectraldb.run.measure import measure_checkpoints
    from spectraldb.run.progress import reporter_for
    from spectraldb.spec.checkpoints import load_checkpoints

    need_extra("measure", "hf")

    with translated():
        cspec, runs = load_checkpoints(spec, set_ or [])
        path = db or cspec.store
        result = measure_checkpoints(cspec, runs, path, reporter=reporter_for(sys.stderr), retry_failed=retry_failed,
                                     executor=executor, address=address)
    _say_stored(result, spec, path, "checkpoints", "measured checkpoint(s)", "`specdb measure` or `specdb run`")
