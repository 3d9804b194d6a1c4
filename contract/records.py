"""The result a worker hands the driver (docs/design.md §4), as dataclasses.

A worker builds a `RunResult` while it trains; it crosses Ray and the spool as `to_dict()` (plain
values and numpy arrays) and is rebuilt with `from_dict`. What the driver knows itself (the
dataset's vocabulary size, the spec, provenance) never travels inside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from contract.vocabulary import PROTOCOL


def perplexity(loss: float) -> float:
    """exp(loss), the perplexity every source stores; inf where the loss is not finite or exp would
    overflow a float64 (past 709; 700 keeps a margin)."""
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


@dataclass
class Evaluation:
    """One evaluation of the model: losses on a training batch and on the held-out tokens."""
    step: int
    train_loss: float
    val_loss: float
    val_ppl: float


@dataclass
class Spectrum:
    """The eigenvalues of one covariance (step × layer × site × stratum), descending, or a
    skipped stratum (too few tokens): then `eigenvalues` and `min_eigenvalue` are None.
    `metrics` and `reinjection` are attached by `contract.metrics.attach_metrics`."""
    step: int
    layer: int
    site: str
    stratum: str
    n_tokens: int
    n_dim: int
    eigenvalues: Any = None              # numpy float64 vector; None when skipped
    min_eigenvalue: float | None = None  # the raw minimum before clamping; None when skipped
    metrics: dict | None = None
    reinjection: dict | None = None

    @classmethod
    def skipped(cls, *, step: int, layer: int, site: str, stratum: str, n_tokens: int, n_dim: int) -> "Spectrum":
        return cls(step, layer, site, stratum, n_tokens, n_dim)

    @property
    def computed(self) -> bool:
        """Measured, not skipped: it has eigenvalues, or metrics without them (`hard_only`, or
        eigenvalues dropped outside the kept window)."""
        return self.eigenvalues is not None or self.metrics is not None

    @property
    def is_skipped(self) -> bool:
        return not self.computed

    @property
    def key(self) -> tuple:
        return self.step, self.layer, self.site, self.stratum

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if not (k in ("metrics", "reinjection") and v is None)}

    @classmethod
    def from_dict(cls, d: dict) -> "Spectrum":
        eig = d.get("eigenvalues")
        return cls(step=int(d["step"]), layer=int(d["layer"]), site=d["site"], stratum=d["stratum"],
                   n_tokens=int(d["n_tokens"]), n_dim=int(d["n_dim"]),
                   eigenvalues=None if eig is None else np.asarray(eig, dtype=np.float64),
                   min_eigenvalue=d.get("min_eigenvalue"), metrics=d.get("metrics"), reinjection=d.get("reinjection"))


@dataclass
class RunResult:
    """What one run produced: its status, evaluations and spectra (however far it got)."""
    status: str = "running"                    # running → done | diverged | failed
    evals: list[Evaluation] = field(default_factory=list)
    spectra: list[Spectrum] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    device: str | None = None
    forward_dtype: str | None = None           # the dtype the forwards ran in (the fold is float64)
    protocol: int = PROTOCOL
    resumed_from: int | None = None            # the checkpointed step a resumed run continued from

    @classmethod
    def failed(cls, error: str, started_at: float | None = None) -> "RunResult":
        """A run that produced nothing usable (e.g. its worker process died)."""
        now = time.time()
        return cls(status="failed", error=error, started_at=now if started_at is None else started_at,
                   finished_at=now)

    def finish(self, status: str | None = None, error: str | None = None) -> "RunResult":
        if status is not None:
            self.status = status
        if error is not None:
            self.error = error
        self.finished_at = time.time()
        return self

    @property
    def final(self) -> Evaluation | None:
        return self.evals[-1] if self.evals else None

    @property
    def duration_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["evals"] = [e.__dict__.copy() for e in self.evals]
        out["spectra"] = [s.to_dict() for s in self.spectra]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        """Also reads results spooled by earlier versions (which carried `vocab_size`: ignored)."""
        return cls(status=d["status"], evals=[Evaluation(**{k: e[k] for k in ("step", "train_loss", "val_loss",
                                                                                 "val_ppl")}) for e in d.get("evals", [])],
                   spectra=[Spectrum.from_dict(s) for s in d.get("spectra", [])],
                   started_at=d.get("started_at") or 0.0, finished_at=d.get("finished_at"), error=d.get("error"),
                   device=d.get("device"), forward_dtype=d.get("forward_dtype"), protocol=d.get("protocol", PROTOCOL), resumed_from=d.get("resumed_from"))


@dataclass
class CheckpointResult:
    """One saved checkpoint measured (`workers.checkpoints.measure_entry` → the driver): what
    loading revealed (its shape, `gated`, its config), its spectra and its loss on the measured
    tokens — or, with status failed or diverged, the one line saying why."""
    status: str
    started_at: float
    error: str | None = None
    d_model: int | None = None
    n_layer: int | None = None
    ffn_width: int | None = None
    n_head: int | None = None
    context: int | None = None
    gated: bool = False
    config: dict = field(default_factory=dict)
    spectra: list = field(default_factory=list)
    val_loss: float = math.nan
    vocab_size: int | None = None
    tokens: int = 0          # positions measured
    passes: int = 1          # the accumulators' passes under the memory budget
    device: str | None = None
    forward_dtype: str | None = None

    @property
    def shape(self) -> dict:
        return {"d_model": self.d_model, "n_layer": self.n_layer, "ffn_width": self.ffn_width, "n_head": self.n_head,
                "context": self.context}
