"""Track a run trained anywhere into a specdb store: a loop of one's own, HF Trainer, Lightning.

    import workers.probe, spectraldb.track

    probe = workers.probe.attach(model, token_counts=counts)
    with spectraldb.track.track("specdb.duckdb", optimizer="AdamW", d_model=768, n_layer=12, ffn_width=3072, seed=0,
               steps=6000, factors={"dataset": "fineweb"}, probe=probe) as run:
        for step in range(1, 6001):
            ...                                                   # train
            if step % 200 == 0:
                with probe.measuring(batch):
                    model(batch)
                run.log(step, probe=probe, train_loss=loss, val_loss=val)

On leaving the block the run is stored as `done` (or `failed`, with its traceback, if the block
raised; `diverged` if the probe met non-finite activations, with what it had measured). It
reaches the store through the one writer: committed at once when no `specdb run` holds the store,
otherwise written durably to the spool and committed by `specdb ingest` or the next writer —
never lost, never stored twice (the run id is a content hash of the declared factors).
"""

from __future__ import annotations

import math
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from contract.records import Evaluation, RunResult, perplexity
from spectraldb import store
from spectraldb.errors import SpecError, StoreError
from spectraldb.provenance import provenance
from spectraldb.sidecar.lock import WriterLock
from spectraldb.sidecar.files import check_store_folder
from spectraldb.sidecar.spool import Spool, drain
from spectraldb.spec.tracked import TrackedSpec

# declared as factors, these are the built-in columns of the same name
AS_FIELDS = ("lr", "optimizer_name", "batch_size", "corpus", "tokens_seen")


def data_parallel_rank() -> int:
    """This process's rank under torch.distributed (0 without it), read without importing torch."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class Tracker:
    """One tracked run. Build it with `track(...)`; `log` measured steps; `finish` stores it."""

    def __init__(self, store_path, spec: TrackedSpec, vocab_size: int | None = None):
        self.store, self.spec, self.vocab_size = Path(store_path), spec, vocab_size
        self.result = RunResult()
        self.outcome: str | None = None  # "committed" or "spooled", once finished

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    def log(self, step: int, spectra=None, *, probe=None, train_loss: float | None = None,
            val_loss: float | None = None) -> None:
        """One measured step: its spectra (`probe.compute(step)`'s records, or the probe itself)
        and, when given, its losses. After non-finite activations the run is diverged and later
        steps are ignored."""
        if self.result.status == "diverged":
            return
        if probe is not None:
            if hasattr(probe, "where"):  # workers.probe.Probe; a stand-in object may not say
                self.result.device, self.result.forward_dtype = probe.where()
            try:
                spectra = probe.compute(step)
            except ArithmeticError as exc:  # workers.extract.NonFiniteActivations
                self.result.status, self.result.error = "diverged", f"diverged at step {step} ({exc})"
                return
        for record in spectra or []:
            record.step = step
            self.result.spectra.append(record)
        if train_loss is not None or val_loss is not None:
            known = next((e for e in self.result.evals if e.step == step), None)
            if known is None:  # losses may come in several calls for one step (a trainer's logs)
                known = Evaluation(step, math.nan, math.nan, math.inf)
                self.result.evals.append(known)
            if train_loss is not None:
                known.train_loss = float(train_loss)
            if val_loss is not None:
                known.val_loss = float(val_loss)
                known.val_ppl = perplexity(known.val_loss)

    def finish(self, status: str = "done", error: str | None = None) -> str:
        """Store the run; returns "committed" or "spooled" (a `specdb run` held the store). Under
        torch.distributed only rank 0 writes (the probe has reduced every rank's measurements);
        the others return "not written (rank N)"."""
        if self.outcome is not None:
            return self.outcome
        rank = data_parallel_rank()
        if rank != 0:
            self.outcome = f"not written (rank {rank})"
            return self.outcome
        if self.result.status == "diverged":
            status, error = "diverged", self.result.error
        self.result.finish(status, error)
        meta = (self.spec, self.result, provenance(), self.spec.name)
        try:
            with WriterLock(self.store):
                spool = Spool(self.store)
                if spool.pending():
                    drain(spool, self.store, store.LOCK_WAIT_S)
                store.write_run(self.store, *meta, vocab_size=self.vocab_size)
            self.outcome = "committed"
        except StoreError:  # another writer holds the store: the spool keeps it until it commits
            Spool(self.store).put(self.run_id, self.spec.config(), self.result, meta[2], meta[3], self.vocab_size)
            self.outcome = "spooled"
        return self.outcome

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.finish("done")
        else:
            self.finish("failed", "".join(traceback.format_exception(kind, exc, tb, limit=8)))


def track(store_path, *, optimizer: str, d_model: int, n_layer: int, steps: int, ffn_width: int | None = None,
          ffn_mult: float | None = None, seed: int = 0, n_head: int | None = None, context: int | None = None,
          gated: bool | None = None, model_config: dict | None = None, factors: dict | None = None,
          every: int | None = None, tokens: int | None = None, last_k: int = 5, probe=None,
          strata_scope: str | None = None, source: str = "tracked", name: str = "tracked",
          vocab_size: int | None = None, **fields) -> Tracker:
    """A Tracker for one run. Declared factors (`factors`) join --by and --where; `lr`,
    `optimizer_name`, `batch_size`, `corpus`, `tokens_seen` are columns of their own (pass them
    as keywords or factors). With `probe`, its sites, strata and floor are recorded with the run.
    A bad declaration is one SpecError naming the field."""
    check_store_folder(store_path)
    factors = dict(factors or {})
    for key in AS_FIELDS:
        if key in factors:
            fields.setdefault(key, factors.pop(key))
    unknown = set(fields) - set(AS_FIELDS)
    if unknown:
        raise SpecError(f"track: unknown field {sorted(unknown)[0]!r} (declare it in factors=)")
    measure = {"last_k": last_k, "every": every or max(1, steps)}
    if tokens is not None:
        measure["tokens"] = tokens
    if probe is not None:
        gated = probe.gated if gated is None else gated
        strata_scope = strata_scope or probe.strata_scope
        measure |= {"sites": list(probe.measure), "strata": list(probe.strata),
                    "min_stratum_tokens": probe.min_tokens, "precision": probe.precision}
    doc = {"source": source, "name": name, "optimizer": optimizer, "seed": seed, "steps": steps,
           "model": {"d_model": d_model, "n_layer": n_layer, "ffn_width": ffn_width, "ffn_mult": ffn_mult,
                     "n_head": n_head, "context": context, "gated": bool(gated), "config": model_config or {}},
           "factors": factors, "measure": measure, "strata_scope": strata_scope or "global", **fields}
    try:
        spec = TrackedSpec.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "track"
        raise SpecError(f"track: {where}: {err.get('msg', 'invalid')}") from None
    return Tracker(store_path, spec, vocab_size)
