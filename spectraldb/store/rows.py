"""A finished run as the rows of each table: pure functions of the spec, the result and what the
driver knows (provenance, the dataset's vocabulary size). No database here."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np

from contract.records import RunResult, Spectrum
from contract.vocabulary import RANK_COLUMNS, SITE_DEFINITIONS


def timestamp(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None)


def finite(x):
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def run_row(run, result: RunResult, provenance: dict, spec_name: str, vocab_size: int | None) -> dict:
    """The `runs` row of a spectraldb.spec.RunSpec (trained by specdb) or a
    spectraldb.spec.tracked.TrackedSpec (trained elsewhere, or a checkpoint)."""
    final = result.final
    started, finished = result.started_at, result.finished_at
    columns = _tracked_columns(run) if getattr(run, "source", "specdb") != "specdb" else _specdb_columns(run)
    return {
        "run_id": run.run_id, "spec_name": spec_name, **columns, "vocab_size": vocab_size,
        "status": result.status, "error": result.error,
        "final_val_loss": finite(final.val_loss) if final else None,
        "final_val_ppl": finite(final.val_ppl) if final else None, "config": json.dumps(run.config()),
        "git_commit": provenance.get("git_commit"), "versions": json.dumps(provenance.get("versions", {})),
        "host": provenance.get("host"), "device": result.device, "forward_dtype": result.forward_dtype,
        "started_at": timestamp(started),
        "finished_at": timestamp(finished), "duration_s": (finished - started) if finished else None,
        "protocol": result.protocol,
    }


def _specdb_columns(run) -> dict:
    m = run.model
    return {"optimizer": run.label, "optimizer_name": run.optimizer.name, "lr": run.optimizer.lr,
            "ffn_mult": m.ffn_mult, "ffn_width": m.ffn_width, "d_model": m.d_model, "n_layer": m.n_layer,
            "n_head": m.n_head, "context": run.data.context, "corpus": run.data.corpus, "seed": run.train.seed,
            "steps": run.train.steps, "batch_size": run.train.batch_size, "measure_source": run.measure.source,
            "last_k": run.measure.last_k, "pos": m.pos, "norm": m.norm, "postln_frac": m.n_post_norm / m.n_layer,
            "activation": m.activation, "keep_eigenvalues": run.measure.keep_eigenvalues, "source": "specdb",
            "gated": False, "site_definition": SITE_DEFINITIONS[False], "strata_scope": "global",
            "tokens_seen": run.train.steps * run.train.batch_size * run.data.context, "factors": None,
            "workers": run.resources.workers, "reduction": run.measure.reduction}


def _tracked_columns(run) -> dict:
    m = run.model
    shape = {k: getattr(m, k) if m else None for k in ("ffn_mult", "ffn_width", "d_model", "n_layer", "n_head",
                                                        "context", "gated")}
    return {"optimizer": run.optimizer, "optimizer_name": run.optimizer_name, "lr": run.lr, **shape,
            "corpus": run.corpus, "seed": run.seed, "steps": run.steps,
            "batch_size": run.batch_size, "measure_source": run.source, "last_k": run.measure.last_k,
            "keep_eigenvalues": run.measure.keep_eigenvalues, "source": run.source,
            "site_definition": SITE_DEFINITIONS[m.gated] if m else None, "strata_scope": run.strata_scope,
            "tokens_seen": run.tokens_seen, "factors": json.dumps(run.factors, sort_keys=True) if run.factors else None,
            "workers": None, "reduction": None}


def eval_rows(run_id: str, result: RunResult) -> list[dict]:
    return [{"run_id": run_id, "step": e.step, "train_loss": finite(e.train_loss), "val_loss": finite(e.val_loss),
             "val_ppl": finite(e.val_ppl)} for e in result.evals]


def rank_rows(run_id: str, records: list[Spectrum]) -> list[dict]:
    """One ranks row (by column name) per computed spectrum, from the metrics attached to it
    (`contract.metrics.attach_metrics`: by the worker, or by `write_run` for records without)."""
    return [{"run_id": run_id, "step": r.step, "layer": r.layer, "site": r.site, "stratum": r.stratum,
             "n_tokens": r.n_tokens, **{c: r.metrics.get(c) for c in RANK_COLUMNS}}
            for r in records if r.metrics is not None]


def reinjection_rows(run_id: str, records: list[Spectrum]) -> list[dict]:
    """JS(pre, post) and ρ_α = R_α(post)/R_α(pre) where both sites were computed (attached as for
    `rank_rows`)."""
    return [{"run_id": run_id, "step": r.step, "layer": r.layer, "stratum": r.stratum, **r.reinjection}
            for r in records if r.reinjection is not None]


def series_from_end(records: list[Spectrum]) -> dict[tuple, int]:
    """(step, layer, site, stratum) → 1 for the last measured value of its layer × site × stratum
    series, 2 for the one before, … counting only computed spectra: a step at which a stratum
    was skipped does not use up a place of the window (the study's "last K finite values").
    This is the one definition of a run's window; ranks.from_end stores it."""
    series: dict[tuple, list[int]] = {}
    for r in records:
        if r.computed:
            series.setdefault((r.layer, r.site, r.stratum), []).append(r.step)
    return {(step, *key): i + 1 for key, steps in series.items()
            for i, step in enumerate(sorted(steps, reverse=True))}


def kept(records: list[Spectrum], from_end: dict[tuple, int], last_k: int) -> list[Spectrum]:
    """Drop the eigenvalues (not the record) of every spectrum outside its series' window."""
    return [r if from_end.get(r.key, last_k + 1) <= last_k else replace(r, eigenvalues=None) for r in records]


def spectra_rows(run_id: str, records: list[Spectrum]) -> list[dict]:
    return [{"run_id": run_id, "step": s.step, "layer": s.layer, "site": s.site, "stratum": s.stratum,
             "n_tokens": s.n_tokens, "n_dim": s.n_dim, "skipped": not s.computed,
             "min_eigenvalue": s.min_eigenvalue,
             "eigenvalues": None if s.eigenvalues is None else np.asarray(s.eigenvalues, dtype=np.float64)}
            for s in records]
