"""`specdb measure SPEC`: saved checkpoints measured one at a time, each stored as a run.

The driver holds the store's writer lock for the whole command (like `specdb run`); a checkpoint
that cannot be loaded or measured becomes a `failed` run with a one-line error, non-finite
activations a `diverged` one, and the others go on. Checkpoints the store already holds (done or
diverged; failed too, unless retried) are skipped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from contract.records import Evaluation, RunResult
from contract.vocabulary import FINISHED
from spectraldb import catalog, store
from spectraldb.errors import one_line
from spectraldb.provenance import provenance
from spectraldb.run import executors
from spectraldb.run.lock import WriterLock
from spectraldb.run.preflight import check_store_folder
from spectraldb.run.progress import PlainReporter
from spectraldb.run.sweep import SweepResult
from spectraldb.spec.checkpoints import CheckpointsSpec
from spectraldb.spec.tracked import TrackedModel, TrackedSpec


def plan_rows(spec: CheckpointsSpec, runs: list[TrackedSpec], db) -> list[dict]:
    known = catalog.statuses(db)
    return [{"run_id": r.run_id, "checkpoint": e.ref, "optimizer": e.optimizer, "step": e.step,
             "tokens_seen": e.tokens_seen, "status": known.get(r.run_id, "new")}
            for e, r in zip(spec.checkpoints, runs)]


def measure_checkpoints(spec: CheckpointsSpec, runs: list[TrackedSpec], db: str | Path, *,
                        reporter: PlainReporter | None = None, retry_failed: bool = False) -> SweepResult:
    reporter = reporter or PlainReporter()
    check_store_folder(db)
    with WriterLock(db):
        store.migrate(db)
        known = catalog.statuses(db)
        skip = FINISHED if retry_failed else FINISHED + ("failed",)
        todo = [(e, r) for e, r in zip(spec.checkpoints, runs) if known.get(r.run_id) not in skip]
        result = SweepResult(total=len(runs), skipped=len(runs) - len(todo))
        if not todo:
            return result
        documents = executors.checkpoint_documents(spec.corpus)
        prov, m = provenance(), spec.measure
        reporter.start(len(todo), result.skipped)
        for entry, run in todo:
            started, vocab = time.time(), None
            try:
                out = executors.measure_checkpoint(
                    documents=documents, path=entry.path, model_id=entry.model, revision=entry.revision,
                    tokens=m.tokens, context=m.context, strata=m.strata, min_tokens=m.min_stratum_tokens,
                    precision=m.precision, step=entry.step or 0, batch=m.batch,
                    patterns=tuple(m.patterns) if m.patterns else None)
                shape = {k: out.get(k) for k in ("d_model", "n_layer", "ffn_width", "n_head", "context")}
                run = run.model_copy(update={"model": TrackedModel(**shape, gated=out["gated"], config=out["config"]),
                                             "tokens_seen": entry.tokens_seen})
                loss = out["val_loss"]
                ppl = math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf
                res = RunResult(status="done", spectra=out["spectra"], started_at=started, device="cpu",
                                evals=[Evaluation(entry.step or 0, math.nan, loss, ppl)]).finish()
                vocab = out["vocab_size"]
            except ArithmeticError as exc:  # workers.extract.NonFiniteActivations
                res = RunResult(status="diverged", error=f"diverged (rule: non-finite activations): {exc}",
                                started_at=started).finish()
            except Exception as exc:  # noqa: BLE001 - a checkpoint that fails is a failed run; the others go on
                res = RunResult.failed(one_line(exc), started)
            store.write_run(db, run, res, prov, spec.name, vocab_size=vocab)
            result.statuses[run.run_id] = res.status
            detail = f" val_ppl={res.final.val_ppl:.1f}" if res.final is not None else ""
            reporter.finish(run.run_id, entry.ref, res.status, res.duration_s or 0.0,
                            detail + (f" — {res.error}" if res.error else ""))
    return result
