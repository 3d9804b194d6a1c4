"""`specdb measure SPEC`: saved checkpoints measured as Ray tasks (or inline), each stored as a run.

One task per checkpoint (spectraldb.run.executors), as many at once as `resources` allow; the
driver is the one writer: it holds the store's writer lock for the whole command (like `specdb
run`) and stores each outcome as it arrives, or spools it when the store cannot take it then (a
reader holds it), committing it before it ends or leaving it for the next writer. A checkpoint
that cannot be loaded or measured becomes a `failed` run with a one-line error, non-finite
activations a `diverged` one, and the others go on; a task whose process dies is retried by Ray.
Checkpoints the store already holds (done or diverged; failed too, unless retried) or spooled are
skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from contract.memory import MemoryBudgetError, default_budget, uniform_plan
from contract.records import CheckpointResult, Evaluation, RunResult, perplexity
from contract.vocabulary import FINISHED
from spectraldb import store
from spectraldb.errors import SpecError, one_line
from spectraldb.provenance import provenance
from spectraldb.reader import stored_statuses
from spectraldb.run import executors
from spectraldb.sidecar.lock import WriterLock
from spectraldb.sidecar.files import check_store_folder
from spectraldb.run.progress import PlainReporter
from spectraldb.run.sink import COMMIT_WAIT_S, FINAL_WAIT_S
from spectraldb.sidecar.spool import Spool, drain
from spectraldb.run.sweep import EXECUTORS, SweepResult
from spectraldb.spec.checkpoints import CheckpointEntry, CheckpointsSpec
from spectraldb.spec.tracked import TrackedModel, TrackedSpec


CONFIG_BYTES = 1 << 20  # a model folder's config.json larger than this is not read for planning
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
WIDTH_KEYS = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "ffn_hidden_size")


def declared_shape(entry: CheckpointEntry) -> tuple[int, int] | None:
    """(layers, FFN width) a local model folder's config.json declares, or None when it declares
    none readable (a model id in the HF cache, a missing or odd file: known once it is loaded)."""
    if entry.path is None:
        return None
    try:
        path = Path(entry.path) / "config.json"
        if not path.is_file() or path.stat().st_size > CONFIG_BYTES:
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None

    def whole(keys):
        return next((v for k in keys if type(v := config.get(k)) is int and 0 < v < 2**31), None)

    layers, width = whole(LAYER_KEYS), whole(WIDTH_KEYS)
    if width is None and "n_inner" in config and type(config.get("n_embd")) is int:
        width = 4 * config["n_embd"]  # GPT-2: n_inner null means 4 × n_embd
    return (layers, width) if layers and width else None


def memory_plans(spec: CheckpointsSpec) -> list:
    """Each entry's measurement plan (None where its shape is unknown before loading), under
    `measure.memory` or, for CPU tasks, half this machine's memory. Refuses (SpecError) a budget
    that one layer × site of a declared shape exceeds, before anything runs."""
    budget = spec.measure.memory
    if budget is None and spec.resources.gpus == 0:
        budget = default_budget()
    plans = []
    for i, entry in enumerate(spec.checkpoints):
        shape = declared_shape(entry)
        if shape is None or budget is None:
            plans.append(None)
            continue
        try:
            plans.append(uniform_plan(2 * shape[0], shape[1], spec.measure.strata, budget))
        except MemoryBudgetError as exc:
            raise SpecError(f"checkpoints[{i}] ({entry.ref}): {exc}") from None
    return plans


def plan_rows(spec: CheckpointsSpec, runs: list[TrackedSpec], db) -> list[dict]:
    known = stored_statuses(db)
    return [{"run_id": r.run_id, "checkpoint": e.ref, "optimizer": e.optimizer, "step": e.step,
             "tokens_seen": e.tokens_seen, "ffn_width": (declared_shape(e) or (None, None))[1],
             "measure_gib": None if p is None else round(p.peak / 2**30, 3), "passes": None if p is None else p.n_passes,
             "status": known.get(r.run_id, "new")}
            for e, r, p in zip(spec.checkpoints, runs, memory_plans(spec))]


def job(spec: CheckpointsSpec, entry: CheckpointEntry) -> dict:
    """The keyword arguments of workers.checkpoints.measure for one entry (documents apart)."""
    m = spec.measure
    return dict(path=entry.path, model_id=entry.model, revision=entry.revision, tokens=m.tokens, context=m.context,
                strata=m.strata, min_tokens=m.min_stratum_tokens, precision=m.precision, step=entry.step or 0,
                batch=m.batch, patterns=tuple(m.patterns) if m.patterns else None, memory=m.memory, dtype=m.dtype,
                metrics=m.metrics, gated=m.gated)


def outcome_result(entry: CheckpointEntry, run: TrackedSpec, out: CheckpointResult):
    """(run with the checkpoint's shape, RunResult, vocabulary size) of one task's outcome."""
    if out.status != "done":
        return run, RunResult(status=out.status, error=out.error, started_at=out.started_at).finish(), None
    run = run.model_copy(update={"model": TrackedModel(**out.shape, gated=out.gated, config=out.config),
                                 "tokens_seen": entry.tokens_seen})
    res = RunResult(status="done", spectra=out.spectra, started_at=out.started_at, device=out.device,
                    forward_dtype=out.forward_dtype,
                    evals=[Evaluation(entry.step or 0, math.nan, out.val_loss, perplexity(out.val_loss))]).finish()
    return run, res, out.vocab_size


def measure_checkpoints(spec: CheckpointsSpec, runs: list[TrackedSpec], db: str | Path, *,
                        reporter: PlainReporter | None = None, retry_failed: bool = False, executor: str = "ray",
                        address: str | None = None) -> SweepResult:
    if executor not in EXECUTORS:
        raise SpecError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    reporter = reporter or PlainReporter()
    check_store_folder(db)
    memory_plans(spec)
    with WriterLock(db):
        store.migrate(db)
        spool = Spool(db)
        damaged: list[str] = []
        recovered, _ = drain(spool, db, store.LOCK_WAIT_S, damaged) if spool.pending() else (0, [])
        known = stored_statuses(db)
        skip = FINISHED if retry_failed else FINISHED + ("failed",)
        spooled = spool.run_ids()  # measured, waiting for a commit: never measured again
        todo = [(e, r) for e, r in zip(spec.checkpoints, runs)
                if known.get(r.run_id) not in skip and r.run_id not in spooled]
        result = SweepResult(total=len(runs), skipped=len(runs) - len(todo), recovered=recovered, damaged=damaged)
        if not todo:
            return result
        documents = executors.checkpoint_documents(spec.corpus)
        prov = provenance()
        reporter.start(len(todo), result.skipped)

        def deliver(i: int, out: dict) -> None:
            entry, run = todo[i]
            run, res, vocab = outcome_result(entry, run, out)
            if run.run_id in result.statuses:
                return  # delivered once already: stored once
            note = ""
            try:
                store.write_run(db, run, res, prov, spec.name, vocab_size=vocab, wait_s=COMMIT_WAIT_S)
            except Exception as exc:  # noqa: BLE001 - a reader holds the store, the disk is full: keep it
                kept = spool.put(run.run_id, run.config(), res, prov, spec.name, vocab)
                note = f" — not committed yet ({one_line(exc)}); kept in {kept}"
            result.statuses[run.run_id] = res.status
            detail = f" val_ppl={res.final.val_ppl:.1f}" if res.final is not None else ""
            reporter.finish(run.run_id, entry.ref, res.status, res.duration_s or 0.0,
                            detail + (f" — {res.error}" if res.error else "") + note)

        jobs = [job(spec, e) for e, _ in todo]
        if executor == "inline":
            executors.measure_inline([{**j, "documents": documents} for j in jobs], deliver)
        else:
            executors.measure_ray(jobs, documents, spec.resources, address, deliver)
        if spool.pending():  # what a reader kept out: committed once it lets go, else kept for the next writer
            result.waiting = drain(spool, db, FINAL_WAIT_S)[1]
    return result
