"""A run specdb did not train: what its user declares about it, and its run id.

A tracked run (a training loop of one's own, HF Trainer, Lightning) or a measured checkpoint
declares its factors: the optimizer label, d_model, n_layer, the FFN width (or multiplier), seed
and steps, and any further named factors (`lr`, `dataset`, `revision`, …) that `--by` and
`--where` then read like the built-in ones. Its run id is a content hash of those factors and
the model's configuration, so the same run tracked twice is one run.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Literal

from pydantic import Field, model_validator

from contract.vocabulary import FACTORS, PROTOCOL, STRATA_SCOPES
from spectraldb.predicates import FACTOR_NAME, MAX_FACTORS
from spectraldb.spec.models import MeasureSpec, RunSpec, hashed_part
from spectraldb.spec.types import INT32_MAX, Name, Section

INT64_MAX = 2**63 - 1  # the store's BIGINT columns
# columns of `runs` a declared factor may not shadow
RESERVED = set(FACTORS) | {"run_id", "status", "error", "config", "source", "ffn_width", "factors", "step",
                           "tokens_seen", "gated", "strata_scope", "site_definition", "started_at", "finished_at"}
Scalar = str | int | float | bool


class TrackedModel(Section):
    d_model: int = Field(..., ge=1, le=INT32_MAX)
    n_layer: int = Field(..., ge=1, le=INT32_MAX)
    ffn_width: int | None = Field(None, ge=1, le=INT32_MAX)
    ffn_mult: float | None = Field(None, gt=0)
    n_head: int | None = Field(None, ge=1, le=INT32_MAX)
    context: int | None = Field(None, ge=1, le=INT32_MAX)
    gated: bool = False
    config: dict = Field(default_factory=dict)  # the model's own configuration (e.g. an HF config), hashed

    @model_validator(mode="after")
    def _width(self):
        if self.ffn_width is None and self.ffn_mult is None:
            raise ValueError("give ffn_width (the FFN's hidden width) or ffn_mult")
        if self.ffn_width is None:
            width = self.ffn_mult * self.d_model
            if abs(width - round(width)) > 1e-9:
                raise ValueError(f"ffn_mult {self.ffn_mult} × d_model {self.d_model} is not a whole width")
            self.ffn_width = int(round(width))
        self.ffn_mult = self.ffn_width / self.d_model
        return self


class TrackedSpec(Section):
    """A run trained (or a checkpoint saved) elsewhere, measured by `workers.probe`."""
    source: Literal["tracked", "checkpoint"] = "tracked"
    name: Name = "tracked"
    optimizer: Name                                   # the label the verbs group by
    optimizer_name: Name | None = None                # its family (adamw, muon, …), when known
    lr: float | None = Field(None, gt=0)
    model: TrackedModel | None = None                 # None only for a checkpoint that could not be loaded
    checkpoint: Name | None = None                    # a checkpoint's folder, or MODEL@REVISION
    seed: int = Field(0, ge=0, le=INT32_MAX)
    steps: int = Field(..., ge=0, le=INT32_MAX)
    batch_size: int | None = Field(None, ge=1, le=INT32_MAX)
    corpus: Name | None = None
    tokens_seen: int | None = Field(None, ge=0, le=INT64_MAX)
    factors: dict[str, Scalar] = Field(default_factory=dict, max_length=MAX_FACTORS)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    strata_scope: Literal[STRATA_SCOPES] = "global"

    @model_validator(mode="after")
    def _factors(self):
        if self.model is None and self.source != "checkpoint":
            raise ValueError("model: declare d_model, n_layer and ffn_width (or ffn_mult)")
        for key, value in self.factors.items():
            if not FACTOR_NAME.fullmatch(key):  # the predicates' rule: a name --by and --where can read
                raise ValueError(f"factors: {key!r} is not a factor name (lower case letters, digits and _, "
                                 "starting with a letter, at most 40)")
            if key in RESERVED:
                raise ValueError(f"factors: {key!r} is a built-in column of runs; declare it as a field instead")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"factors: {key} is {value}; a factor must be finite")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
                raise ValueError(f"factors: {key} does not fit 64 bits")
            if isinstance(value, str) and len(value) > 200:
                raise ValueError(f"factors: {key} is longer than 200 characters")
        return self

    @property
    def label(self) -> str:
        return self.optimizer

    @property
    def run_id(self) -> str:
        """A hash of the declaration; a checkpoint's is that of its entry (where it is, its step and
        factors), not of what loading it revealed, so a checkpoint that failed to load and is
        measured again later is the same run."""
        exclude = {"name", "model"} if self.source == "checkpoint" else {"name"}
        # measure fields added after tracked run ids were first issued: out of the hash as in RunSpec's
        doc = hashed_part(self.model_dump(mode="json", exclude=exclude), ("measure.memory",),
                          {"measure.metrics": "full"})
        doc["protocol"] = PROTOCOL
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def config(self) -> dict:
        return self.model_dump(mode="json")


def spec_of(config: dict):
    """The spec a stored or spooled config describes: a TrackedSpec for runs trained elsewhere and
    checkpoints (their `source`), a RunSpec for specdb's own."""
    if isinstance(config, dict) and config.get("source") in ("tracked", "checkpoint"):
        return TrackedSpec.model_validate(config)
    return RunSpec.model_validate(config)
