"""The optimizers a spec may name: one strict section per family, a shorthand (`adamw`,
`{dion: {rank_fraction: 0.5}}`), and sweep entries that list several variants."""

from __future__ import annotations

import itertools
from fractions import Fraction
from typing import Annotated, Literal, Union, get_origin

from pydantic import BeforeValidator, Field

from spectraldb.spec.types import INT32_MAX, Name, Pair, Section

OPTIMIZER_NAMES = ("adamw", "muon", "normuon", "dion")


class AdamWSpec(Section):
    name: Literal["adamw"]
    label: Name | None = None
    lr: float = Field(3e-3, gt=0)
    betas: Pair = [0.9, 0.95]
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)

    def default_label(self) -> str:
        return "AdamW"


class _LionScalars(Section):
    """Matrix optimizers put the embedding and LM head on Lion (head lr ÷ √d_model)."""
    scalar_lr: float | None = Field(None, gt=0)  # None = the optimizer's lr
    lion_betas: Pair = [0.95, 0.98]


class MuonSpec(_LionScalars):
    name: Literal["muon"]
    label: Name | None = None
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(0.01, ge=0)
    lr_scale: Literal["spectral", "keller"] = "spectral"
    ns: Literal["dion_quintic5", "keller", "polar_express5"] = "dion_quintic5"
    ns_dtype: Literal["auto", "bf16", "fp32"] = "auto"

    def default_label(self) -> str:
        return "Muon"


class NorMuonSpec(MuonSpec):
    name: Literal["normuon"]  # type: ignore[assignment]
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    mode: Literal["preserve_norm", "match_rms"] = "preserve_norm"

    def default_label(self) -> str:
        return "NorMuon"


class DionSpec(_LionScalars):
    name: Literal["dion"]
    label: Name | None = None
    lr: float = Field(0.02, gt=0)
    mu: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    rank_fraction: float = Field(1.0, gt=0, le=1)
    rank_multiple_of: int = Field(1, ge=1, le=INT32_MAX)
    eps: float = Field(1e-8, gt=0)
    state_dtype: Literal["fp32", "bf16"] = "fp32"

    def default_label(self) -> str:
        f = Fraction(self.rank_fraction).limit_denominator(4096)
        return f"Dion ({f.numerator}/{f.denominator})" if f.denominator != 1 else f"Dion ({f.numerator})"


OPTIMIZER_SPECS = {"adamw": AdamWSpec, "muon": MuonSpec, "normuon": NorMuonSpec, "dion": DionSpec}


def _optimizer_shorthand(v):
    """`adamw` → {name: adamw}; {dion: {rank_fraction: 0.5}} → {name: dion, rank_fraction: 0.5}."""
    if isinstance(v, str):
        return {"name": v}
    if isinstance(v, dict) and len(v) == 1 and "name" not in v:
        (key, body), = v.items()
        if key in OPTIMIZER_SPECS and isinstance(body, (dict, type(None))):
            return {"name": key, **(body or {})}
    return v


def optimizer_variants(v) -> list:
    """A sweep entry {dion: {rank_fraction: [0.5, 0.0625]}} lists one optimizer per value
    (several list-valued fields multiply); any other entry stands for itself."""
    v = _optimizer_shorthand(v)
    if not isinstance(v, dict):
        return [v]
    keys = [k for k, x in v.items() if isinstance(x, list) and k not in LIST_FIELDS]
    keys += [k for k in LIST_FIELDS if isinstance(v.get(k), list) and v[k] and isinstance(v[k][0], list)]
    if not keys:
        return [v]
    return [{**v, **dict(zip(keys, combo))} for combo in itertools.product(*(v[k] for k in keys))]


# Optimizer fields whose value is itself a list (betas, lion_betas): in a sweep entry a list of
# those lists is several variants, a plain list is one value.
LIST_FIELDS = tuple(sorted({name for spec in OPTIMIZER_SPECS.values() for name, f in spec.model_fields.items()
                            if get_origin(f.annotation) is list}))

OptimizerSpec = Annotated[Union[AdamWSpec, MuonSpec, NorMuonSpec, DionSpec], Field(discriminator="name"),
                          BeforeValidator(_optimizer_shorthand)]
