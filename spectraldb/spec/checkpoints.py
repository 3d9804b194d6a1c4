"""A checkpoints spec (`specdb measure SPEC`): saved models to measure, each a run of the store.

    name: pythia-suite
    store: suite.duckdb
    corpus: sotu                      # any text corpus; each model's own tokenizer reads it
    measure: {tokens: 32768, context: 512, min_stratum_tokens: 1000, memory: 8GiB}
    resources: {cpus: 1, gpus: 0}     # per checkpoint: one Ray task each, as many at once as fit
    checkpoints:
      - {path: ckpts/step1000, optimizer: AdamW, step: 1000, tokens_seen: 2097152000}
      - {model: EleutherAI/pythia-70m, revision: step3000, optimizer: AdamW, step: 3000,
         factors: {size: 70m}}        # a revision already in the local HF cache: nothing downloads

Each entry is a run (`source: checkpoint`); its run id is a hash of the entry, so measuring the
spec again skips what the store holds, as `specdb run` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from contract.vocabulary import DEFAULT_STORE
from spectraldb.errors import SpecError
from spectraldb.spec.models import MeasureSpec
from spectraldb.spec.types import INT32_MAX, Bytes, Name, Section, Stratum
from spectraldb.spec.source import _first_error, fmt_path, parse_yaml, read_spec_text
from spectraldb.spec.sweep import read_source
from spectraldb.predicates import MAX_FACTORS
from spectraldb.spec.tracked import INT64_MAX, Scalar, TrackedSpec


class CheckpointEntry(Section):
    path: Name | None = None        # a local HF model folder (config, weights, tokenizer)
    model: Name | None = None       # or a model id whose `revision` is in the local HF cache
    revision: Name | None = None
    optimizer: Name
    optimizer_name: Name | None = None
    lr: float | None = Field(None, gt=0)
    step: int | None = Field(None, ge=0, le=INT32_MAX)
    tokens_seen: int | None = Field(None, ge=0, le=INT64_MAX)
    seed: int = Field(0, ge=0, le=INT32_MAX)
    factors: dict[str, Scalar] = Field(default_factory=dict, max_length=MAX_FACTORS)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.model is None):
            raise ValueError("give path (a local model folder) or model (an id in the local HF cache), not both")
        if self.revision is not None and self.model is None:
            raise ValueError("revision goes with model (a local folder is one revision)")
        return self

    @property
    def ref(self) -> str:
        return self.path if self.path is not None else f"{self.model}@{self.revision or 'main'}"


class CheckpointMeasure(Section):
    tokens: int = Field(32768, ge=64, le=INT32_MAX)
    context: int = Field(512, ge=4, le=65536)
    strata: list[Stratum] = Field(default_factory=lambda: ["all", "head", "mid", "tail"], min_length=1)
    min_stratum_tokens: int = Field(1000, ge=2, le=INT32_MAX)
    precision: Literal["fp64", "fp32"] = "fp64"
    memory: Bytes | None = None  # the accumulators' budget (None: half the device's memory); past it, passes
    # the forwards' dtype: auto = the stored dtype on a GPU, float32 on a CPU (the fold is float64)
    dtype: Literal["auto", "stored", "float32", "bfloat16", "float16"] = "auto"
    metrics: Literal["full", "hard_only"] = "full"  # hard_only: the hard rank alone, no eigendecomposition
    batch: int = Field(8, ge=1, le=4096)
    # for models whose FFNs are not found by family: [FIRST_PROJECTION_REGEX, DOWN_PROJECTION_REGEX]
    patterns: list[Name] | None = Field(None, min_length=2, max_length=2)
    gated: bool = False  # with patterns: the first projection is a gate (act(gate) * up feeds the down-projection)


class CheckpointResources(Section):
    """What each checkpoint's Ray task asks for: as many run at once as the cluster holds."""
    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)
    memory: Bytes | None = None   # Ray's memory resource per task (None: not reserved)
    max_retries: int = Field(2, ge=0, le=100)  # re-runs of a checkpoint whose worker process died


class CheckpointsSpec(Section):
    name: Name = "checkpoints"
    store: Name = DEFAULT_STORE
    corpus: Name = "sotu"
    measure: CheckpointMeasure = Field(default_factory=CheckpointMeasure)
    resources: CheckpointResources = Field(default_factory=CheckpointResources)
    checkpoints: list[CheckpointEntry] = Field(..., min_length=1)

    def runs(self) -> list[TrackedSpec]:
        """One run per entry, its shape filled in once the checkpoint is loaded."""
        m = self.measure
        measure = MeasureSpec(every=1, last_k=1, strata=m.strata, tokens=m.tokens,
                              min_stratum_tokens=m.min_stratum_tokens, precision=m.precision, metrics=m.metrics)
        return [TrackedSpec(source="checkpoint", name=self.name, optimizer=e.optimizer, optimizer_name=e.optimizer_name,
                            lr=e.lr, checkpoint=e.ref, seed=e.seed, steps=e.step or 0, corpus=self.corpus,
                            tokens_seen=e.tokens_seen, factors=e.factors, measure=measure)
                for e in self.checkpoints]


def is_checkpoints_spec(path: str | Path) -> bool:
    """A spec file whose top level lists `checkpoints:` (read cheaply, errors left to the loader)."""
    try:
        doc, _ = parse_yaml(read_spec_text(Path(path)), Path(path).name)
    except SpecError:
        return False
    return isinstance(doc, dict) and "checkpoints" in doc


def load_checkpoints(path: str | Path, overrides: list[str] = ()) -> tuple[CheckpointsSpec, list[TrackedSpec]]:
    """Read, override and validate a checkpoints spec; errors name file:line and the field."""
    src = read_source(path, overrides)
    doc = src.doc
    try:
        spec = CheckpointsSpec.model_validate(doc)
        runs = spec.runs()
    except ValidationError as exc:
        loc, msg = _first_error(exc, doc)
        raise SpecError(f"{src.where(loc)} {fmt_path(loc) or 'spec'}: {msg}") from None
    seen: dict[str, int] = {}
    for i, run in enumerate(runs):
        if run.run_id in seen:
            raise SpecError(f"{src.where(('checkpoints', i))} checkpoints[{i}]: the same checkpoint, step and factors "
                            f"as checkpoints[{seen[run.run_id]}]")
        seen[run.run_id] = i
    return spec, runs
