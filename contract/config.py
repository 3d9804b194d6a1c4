"""The run configuration a worker receives (docs/design.md §4): typed records, every value
resolved once by the spec (`RunSpec.worker_config()`), read by field, never by key.

The spec (spectraldb/spec) validates what a user wrote; these records carry the result to a
worker that imports neither pydantic nor the driver. A spec section's fields map onto its record's
by name: a field added to one and not the other fails `tests/unit/test_contract.py`. Frozen, and
plain values only, so a record pickles across Ray and compares by value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DataConfig:
    corpus: str
    vocab_size: int
    context: int
    heldout_fraction: float


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int
    d_model: int
    n_head: int
    ffn_mult: float
    pos: str
    norm: str
    postln_frac: float | None
    activation: str


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    warmup: int
    warmdown: float
    seed: int
    device: str
    eval_tokens: int
    diverged_ppl: float


@dataclass(frozen=True)
class AdamWConfig:
    name: str
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    eps: float


@dataclass(frozen=True)
class MuonConfig:
    name: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    lr_scale: str
    ns: str
    ns_dtype: str
    scalar_lr: float          # resolved: the optimizer's lr where the spec left it out
    lion_betas: tuple[float, float]


@dataclass(frozen=True)
class NorMuonConfig(MuonConfig):
    beta2: float
    eps: float
    mode: str


@dataclass(frozen=True)
class DionConfig:
    name: str
    lr: float
    mu: float
    weight_decay: float
    rank_fraction: float
    rank_multiple_of: int
    eps: float
    state_dtype: str
    scalar_lr: float
    lion_betas: tuple[float, float]


OptimizerConfig = AdamWConfig | MuonConfig | NorMuonConfig | DionConfig
OPTIMIZER_CONFIGS = {"adamw": AdamWConfig, "muon": MuonConfig, "normuon": NorMuonConfig, "dion": DionConfig}


@dataclass(frozen=True)
class MeasureConfig:
    every: int
    sites: tuple[str, ...]
    strata: tuple[str, ...]
    tokens: int              # the strata's positions per measured step
    pooled_tokens: int       # the pooled `all` spectrum's (resolved: measure.all_tokens or tokens)
    source: str              # heldout | train_batch
    min_stratum_tokens: int
    precision: str
    memory: int | None       # the accumulators' budget in bytes (None: half the device's memory)
    metrics: str             # full | hard_only


@dataclass(frozen=True)
class ResourcesConfig:
    cpus: float
    gpus: float
    workers: int


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    optimizer: OptimizerConfig
    measure: MeasureConfig
    resources: ResourcesConfig
    checkpoint_every: int | None  # save the whole training state every N steps (None: never)


def record(cls, values: dict, **resolved):
    """`cls` from a spec section's plain values: its fields by name (lists become tuples), the
    values the spec resolves given apart. A field `cls` has that `values` lacks is a KeyError."""
    out = {}
    for f in fields(cls):
        value = resolved[f.name] if f.name in resolved else values[f.name]
        out[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**out)
