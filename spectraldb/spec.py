"""experiments.yaml: strict models, sweep expansion, run ids, and errors that name file:line.

A spec is one run's settings (data, model, train, optimizer, measure, resources) plus a
`sweep:` of axes. Each axis is a dotted path (or an alias: optimizer, ffn_mult, seed) with
a list of values; axes combine as a product, and axes inside one `zip:` group move together.
Expansion yields fully resolved RunSpecs; run_id is a hash of the parts that change results.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from fractions import Fraction
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from spectraldb.errors import SpecError
from workers.protocol import PROTOCOL

Site = Literal["pre", "post"]
Stratum = Literal["all", "head", "mid", "tail"]
Beta = Annotated[float, Field(ge=0, lt=1)]
Pair = Annotated[list[Beta], Field(min_length=2, max_length=2)]
INT32_MAX = 2**31 - 1  # the store's INTEGER columns
MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; anything larger is a mistake or an attack
MAX_YAML_NODES = 100_000  # after alias expansion (a 1 KB alias bomb expands to billions)
MAX_YAML_DEPTH = 64
OPTIMIZER_NAMES = ("adamw", "muon", "normuon", "dion")
ALIASES = {"ffn_mult": "model.ffn_mult", "seed": "train.seed"}
# Fields that change how or where a run executes, not what it computes.
NOT_HASHED = ("name", "store", "resources", "checkpoint", "train.device", "optimizer.label")
# Fields added after run ids were first issued: left out of the hash while they hold the
# value that reproduces the earlier behaviour, so existing stores keep their run ids.
HASHED_UNLESS_DEFAULT = {"model.pos": "rope", "model.norm": "pre", "model.postln_frac": None,
                         "model.activation": "relu2", "measure.keep_eigenvalues": "all"}


class Section(BaseModel):
    # no NaN or ±inf anywhere: an inf eps or a NaN beta would train and be stored as "done"
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DataSpec(Section):
    corpus: str = "sotu"
    vocab_size: int = Field(4096, ge=256, le=65536)
    context: int = Field(64, ge=4, le=8192)
    heldout_fraction: float = Field(0.1, gt=0, lt=1)


class ModelSpec(Section):
    n_layer: int = Field(2, ge=1, le=INT32_MAX)
    d_model: int = Field(64, ge=8, le=INT32_MAX)
    n_head: int = Field(4, ge=1, le=INT32_MAX)
    ffn_mult: float = Field(4.0, gt=0)
    pos: Literal["rope", "nope", "learned"] = "rope"
    norm: Literal["pre", "post"] = "pre"
    postln_frac: float | None = Field(None, ge=0, le=1)  # norm: post → first ⌊L·frac⌋ blocks; None = all
    activation: Literal["relu2", "gelu"] = "relu2"

    @property
    def n_post_norm(self) -> int:
        if self.norm != "post":
            return 0
        return math.floor(self.n_layer * (1.0 if self.postln_frac is None else self.postln_frac))

    @property
    def ffn_width(self) -> int:
        return int(round(self.ffn_mult * self.d_model))


class TrainSpec(Section):
    steps: int = Field(600, ge=1, le=INT32_MAX)
    batch_size: int = Field(32, ge=1, le=INT32_MAX)
    warmup: int = Field(0, ge=0, le=INT32_MAX)
    warmdown: float = Field(0.2, ge=0, le=1)
    seed: int = Field(0, ge=0, le=INT32_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_tokens: int = Field(16384, ge=1, le=INT32_MAX)


class AdamWSpec(Section):
    name: Literal["adamw"]
    label: str | None = None
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
    label: str | None = None
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
    label: str | None = None
    lr: float = Field(0.02, gt=0)
    mu: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    rank_fraction: float = Field(1.0, gt=0, le=1)
    rank_multiple_of: int = Field(1, ge=1)
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
    keys = [k for k, x in v.items() if isinstance(x, list) and k not in ("betas", "lion_betas")]
    keys += [k for k in ("betas", "lion_betas") if isinstance(v.get(k), list) and v[k] and isinstance(v[k][0], list)]
    if not keys:
        return [v]
    return [{**v, **dict(zip(keys, combo))} for combo in itertools.product(*(v[k] for k in keys))]


OptimizerSpec = Annotated[Union[AdamWSpec, MuonSpec, NorMuonSpec, DionSpec], Field(discriminator="name"),
                          BeforeValidator(_optimizer_shorthand)]


class MeasureSpec(Section):
    every: int = Field(100, ge=1, le=INT32_MAX)
    last_k: int = Field(5, ge=1, le=INT32_MAX)
    sites: list[Site] = Field(default_factory=lambda: ["pre", "post"], min_length=1)
    strata: list[Stratum] = Field(default_factory=lambda: ["all", "head", "mid", "tail"], min_length=1)
    tokens: int = Field(32768, ge=64, le=INT32_MAX)
    source: Literal["heldout", "train_batch"] = "heldout"
    min_stratum_tokens: int = Field(1000, ge=2, le=INT32_MAX)
    keep_eigenvalues: Literal["all", "last_k"] = "all"  # ranks are always kept

    @model_validator(mode="after")
    def _unique(self):
        for name in ("sites", "strata"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        return self


class ResourcesSpec(Section):
    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)  # fractional: several small runs share one GPU
    max_retries: int = Field(2, ge=0, le=100)  # re-runs of a run whose worker process died


class CheckpointSpec(Section):
    every: int = Field(..., ge=1, le=INT32_MAX)  # save the whole training state every N steps
    dir: str = "checkpoints"                # one file per run: <dir>/<run_id>.pt
    keep: bool = False                      # keep the file after the run is stored


class RunSpec(Section):
    name: str = "specdb"
    store: str = "specdb.duckdb"
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
        doc = self.model_dump(mode="json")
        for path in NOT_HASHED + tuple(HASHED_UNLESS_DEFAULT):
            *parents, leaf = path.split(".")
            node = doc
            for p in parents:
                node = node[p]
            if path in NOT_HASHED or node.get(leaf) == HASHED_UNLESS_DEFAULT[path]:
                node.pop(leaf, None)
        if PROTOCOL > 1:  # a run measured under another protocol is another run
            doc["protocol"] = PROTOCOL
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def config(self) -> dict:
        """The plain dict a worker receives."""
        return self.model_dump(mode="json")


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
    return None


# ---------------------------------------------------------------- YAML with line numbers

class _Loader(yaml.SafeLoader):
    pass


# YAML 1.1 reads 3e-3 as a string; researchers write learning rates that way, so accept it.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*(?:[eE][-+]?[0-9]+)|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*\.[0-9_]*|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


@dataclass
class Source:
    """Where a spec came from: file name, parsed document, and its YAML node tree."""
    name: str
    doc: dict
    node: Any = None
    overrides: dict[str, str] = field(default_factory=dict)

    def line(self, path: tuple) -> int | None:
        node, best = self.node, None
        for part in path:
            if node is None:
                break
            best = node.start_mark.line + 1
            nxt = None
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == part:
                        best, nxt = k.start_mark.line + 1, v
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                nxt = node.value[part]
            node = nxt
        if node is not None:
            best = node.start_mark.line + 1
        return best

    def where(self, path: tuple) -> str:
        dotted = ".".join(str(p) for p in path if not isinstance(p, int))
        for key, text in self.overrides.items():
            if dotted and (dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")):
                return f"-S {key}={text}"
        line = self.line(path)
        return f"{self.name}:{line}" if line else self.name


def fmt_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _message(err: dict) -> str:
    t, ctx, inp = err["type"], err.get("ctx", {}), err.get("input")
    if t == "union_tag_invalid":
        return f"unknown optimizer {ctx.get('tag')!r} (expected one of: {', '.join(OPTIMIZER_NAMES)})"
    if t == "union_tag_not_found":
        return f"optimizer needs a name (one of: {', '.join(OPTIMIZER_NAMES)})"
    if t == "extra_forbidden":
        return f"unknown key {err['loc'][-1]!r}"
    if t == "literal_error":
        return f"{inp!r} is not allowed (expected {ctx.get('expected')})"
    msg = err["msg"].removeprefix("Value error, ")
    if t.endswith("_type") or t.endswith("_parsing") or t in ("greater_than", "greater_than_equal",
                                                              "less_than", "less_than_equal"):
        msg += f", got {inp!r}"
    return msg


def _clean_loc(loc: tuple, doc: Any) -> tuple:
    """Drop the discriminator tags pydantic inserts into locations of union members."""
    out, node = [], doc
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("name") == part:
            continue
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _first_error(exc: ValidationError, doc: dict) -> tuple[tuple, str]:
    err = exc.errors()[0]
    return _clean_loc(tuple(err["loc"]), doc), _message(err)


def validate_run(doc: dict, src: Source, value_at: tuple | None = None, key: tuple = ()) -> RunSpec:
    """Validate one run document; with `value_at` (the YAML path of a sweep value whose field
    path is `key`), errors point at that sweep value rather than at the base field."""
    try:
        run = RunSpec.model_validate(doc)
        problem = cross_checks(run)
        if problem is None:
            return run
        loc, msg = problem
    except ValidationError as exc:
        loc, msg = _first_error(exc, doc)
    if value_at is None:
        raise SpecError(f"{src.where(loc)} {fmt_path(loc) or 'spec'}: {msg}")
    rest = loc[len(key):] if loc[: len(key)] == key else ()
    raise SpecError(f"{src.where(value_at + rest)} {fmt_path(value_at + rest)}: {msg}")


# ---------------------------------------------------------------- sweep expansion

def resolve_axis(key: str) -> tuple[str, ...]:
    path = tuple(ALIASES.get(key, key).split("."))
    model: Any = RunSpec
    for i, part in enumerate(path):
        fields = {}
        for m in (model if isinstance(model, tuple) else (model,)):
            fields.update(m.model_fields)
        if part not in fields or part == "sweep":
            raise KeyError(part)
        ann = _unwrap_optional(fields[part].annotation)
        if part == "optimizer" and i == 0:
            model = tuple(OPTIMIZER_SPECS.values())
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif i != len(path) - 1:
            raise KeyError(path[i + 1])
    return path


def _unwrap_optional(ann):
    """`CheckpointSpec | None` → CheckpointSpec, so `-S checkpoint.every=5` resolves."""
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return ann


def _set(doc: dict, path: tuple, value) -> dict:
    out = json.loads(json.dumps(doc))
    if path[0] == "optimizer" and len(path) > 1:  # optimizer.lr on the default or a shorthand optimizer
        out["optimizer"] = _optimizer_shorthand(out.get("optimizer", "adamw"))
    node = out
    for p in path[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[path[-1]] = value
    return out


@dataclass
class Axis:
    keys: list[tuple[str, ...]]   # resolved paths that move together
    names: list[str]              # as written in the spec
    values: list[tuple]           # one tuple (a value per key) per step of the axis
    where: list[list[tuple]]      # YAML path of each value, for errors


def _parse_axes(sweep: Any, src: Source, present: bool = True) -> list[Axis]:
    if not present:
        return []
    if sweep is None or sweep == {}:
        raise SpecError(f"{src.where(('sweep',))} sweep: no axes (list some, or remove `sweep:` for one run)")
    if not isinstance(sweep, dict):
        raise SpecError(f"{src.where(('sweep',))} sweep: expected a mapping of axis: [values]")
    axes = []

    def check_list(key, values, ypath):
        if not isinstance(values, list) or not values:
            raise SpecError(f"{src.where(ypath)} {fmt_path(ypath)}: an axis needs a non-empty list of values")

    def resolve(key, ypath):
        try:
            return resolve_axis(str(key))
        except KeyError as e:
            raise SpecError(f"{src.where(ypath)} {fmt_path(ypath)}: unknown field {e.args[0]!r} "
                            f"(use a dotted path like model.ffn_mult, or one of: optimizer, ffn_mult, seed)") from None

    for key, values in sweep.items():
        if key == "zip":
            groups = values if isinstance(values, list) else [values]
            for gi, group in enumerate(groups):
                gpath = ("sweep", "zip", gi) if isinstance(values, list) else ("sweep", "zip")
                if not isinstance(group, dict) or not group:
                    raise SpecError(f"{src.where(gpath)} {fmt_path(gpath)}: a zip group maps axes to lists")
                lengths = set()
                for k, v in group.items():
                    check_list(k, v, gpath + (k,))
                    lengths.add(len(v))
                if len(lengths) != 1:
                    raise SpecError(f"{src.where(gpath)} {fmt_path(gpath)}: zipped lists differ in length "
                                    f"({', '.join(str(len(v)) for v in group.values())})")
                n = lengths.pop()
                axes.append(Axis([resolve(k, gpath + (k,)) for k in group], [str(k) for k in group],
                                 [tuple(group[k][i] for k in group) for i in range(n)],
                                 [[gpath + (k, i) for k in group] for i in range(n)]))
        else:
            ypath = ("sweep", key)
            check_list(key, values, ypath)
            path = resolve(key, ypath)
            items = [(v, i) for i, v in enumerate(values)]
            if path == ("optimizer",):  # {dion: {rank_fraction: [...]}} lists several variants
                for v, i in items:
                    if not optimizer_variants(v):
                        raise SpecError(f"{src.where(ypath + (i,))} {fmt_path(ypath + (i,))}: "
                                        "a list of optimizer settings is empty (no variant to run)")
                items = [(variant, i) for v, i in items for variant in optimizer_variants(v)]
            axes.append(Axis([path], [str(key)], [(v,) for v, _ in items], [[ypath + (i,)] for _, i in items]))
    seen: dict[tuple, str] = {}
    for ax in axes:
        for k, name in zip(ax.keys, ax.names):
            if k in seen:
                raise SpecError(f"{src.where(('sweep', name))} sweep.{name}: the same field as sweep.{seen[k]}")
            seen[k] = name
    return axes


@dataclass
class Plan:
    spec_name: str
    store: str
    runs: list[RunSpec]
    axes: list[Axis]


def expand(src: Source) -> Plan:
    doc = dict(src.doc)
    present = "sweep" in doc
    sweep = doc.pop("sweep", None)
    base = validate_run(doc, src)
    axes = _parse_axes(sweep, src, present)
    # Validate each axis value on its own first, so the error points at the value's line.
    for ax in axes:
        for vals, where in zip(ax.values, ax.where):
            d = doc
            for k, v in zip(ax.keys, vals):
                d = _set(d, k, v)
            for k, w in zip(ax.keys, where):
                validate_run(d, src, w, k)
    runs: list[RunSpec] = []
    ids: dict[str, int] = {}
    for combo in itertools.product(*[range(len(ax.values)) for ax in axes]) if axes else [()]:
        d = doc
        for ax, i in zip(axes, combo):
            for k, v in zip(ax.keys, ax.values[i]):
                d = _set(d, k, v)
        try:
            run = RunSpec.model_validate(d)
            problem = cross_checks(run)
        except ValidationError as exc:
            problem = _first_error(exc, d)
        if problem is not None:
            loc, msg = problem
            desc = ", ".join(f"{n}={json.dumps(ax.values[i][j])}" for ax, i in zip(axes, combo)
                             for j, n in enumerate(ax.names))
            raise SpecError(f"{src.where(('sweep',))} sweep: run {len(runs) + 1} ({desc}) {fmt_path(loc)}: {msg}")
        if run.run_id in ids:
            raise SpecError(f"{src.where(('sweep',))} sweep: runs {ids[run.run_id] + 1} and {len(runs) + 1} "
                            "are identical (a repeated value in an axis or zip group)")
        ids[run.run_id] = len(runs)
        runs.append(run)
    disambiguate_labels(runs)
    return Plan(base.name, base.store, runs, axes)


def disambiguate_labels(runs: list[RunSpec]) -> None:
    """Give distinct optimizer configurations that share a default label distinct labels,
    naming the fields that differ: AdamW (lr=0.0001) vs AdamW (lr=0.0003)."""
    groups: dict[str, dict[str, dict]] = {}
    for r in runs:
        if r.optimizer.label is None:
            cfg = r.optimizer.model_dump(mode="json", exclude={"label"})
            groups.setdefault(r.label, {})[json.dumps(cfg, sort_keys=True)] = cfg
    for label, configs in groups.items():
        if len(configs) < 2:
            continue
        cfgs = list(configs.values())
        differ = [k for k in cfgs[0] if len({json.dumps(c.get(k)) for c in cfgs}) > 1]
        for r in runs:
            if r.optimizer.label is None and r.label == label:
                cfg = r.optimizer.model_dump(mode="json", exclude={"label"})
                suffix = ", ".join(f"{k}={cfg[k]}" for k in differ)
                r.optimizer.label = f"{label[:-1]}, {suffix})" if label.endswith(")") else f"{label} ({suffix})"


# ---------------------------------------------------------------- loading

def parse_yaml(text: str, name: str) -> tuple[Any, Any]:
    """Parse a spec's YAML with bounds: size, nesting depth and the size after alias expansion
    are limited, so a small hostile file cannot take the machine (an alias bomb, 10⁵ nested `[`)."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{name}: {len(text):,} characters; a spec is at most {MAX_SPEC_BYTES:,}")
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{where} malformed YAML: {problem}") from None
    except RecursionError:
        raise SpecError(f"{name}: nested more than {MAX_YAML_DEPTH} levels deep") from None
    _check_shape(node, name)
    try:
        doc = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise SpecError(f"{where} malformed YAML: {getattr(exc, 'problem', None) or 'cannot construct'}") from None
    except (ValueError, OverflowError) as exc:  # e.g. a 5,000-digit integer
        raise SpecError(f"{name}: a value cannot be read ({str(exc).splitlines()[0][:120]})") from None
    return doc, node


def _children(node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_shape(root, name: str) -> None:
    """Depth, expanded size (aliases counted every time they are used) and duplicate keys, each
    node visited once however often aliases reuse it."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    order, stack, seen = [], [(root, ())], set()
    while stack:  # iterative: no recursion limit to hit
        node, path = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value in keys:
                    raise SpecError(f"{name}:{k.start_mark.line + 1} {fmt_path(path + (k.value,))}: duplicate key")
                keys.add(getattr(k, "value", None))
                stack.append((v, path + (k.value if isinstance(k, yaml.ScalarNode) else "?",)))
                stack.append((k, path))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, path + (i,)) for i, v in enumerate(node.value))
    for node in reversed(order):  # children before parents
        kids = _children(node)
        size[id(node)] = 1 + sum(size.get(id(c), 1) for c in kids)
        depth[id(node)] = 1 + max((depth.get(id(c), 1) for c in kids), default=0)
        if depth[id(node)] > MAX_YAML_DEPTH:
            raise SpecError(f"{name}:{node.start_mark.line + 1} nested more than {MAX_YAML_DEPTH} levels deep")
        if size[id(node)] > MAX_YAML_NODES:
            raise SpecError(f"{name}:{node.start_mark.line + 1} expands to more than {MAX_YAML_NODES:,} values "
                            "(YAML aliases repeat what they point to); write the values out")


def apply_override(doc: dict, text: str) -> tuple[dict, str, str]:
    """Apply one `-S dotted.key=value` (value in YAML syntax) to a spec document."""
    if "=" not in text:
        raise SpecError(f"-S {text}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = parse_yaml(raw, "value")[0] if raw.strip() else None
    except SpecError as exc:
        raise SpecError(f"-S {text}: the value is not valid YAML ({exc})") from None
    if key.startswith("sweep."):
        axis = key[len("sweep."):]
        try:
            target = resolve_axis(axis)
        except KeyError as e:
            raise SpecError(f"-S {text}: unknown field {e.args[0]!r}") from None
        sweep = dict(doc.get("sweep") or {})
        for k in [k for k in sweep if k != "zip" and _safe_resolve(k) == target]:
            del sweep[k]
        sweep[axis] = value
        return {**doc, "sweep": sweep}, key, raw
    try:
        path = resolve_axis(key)
    except KeyError as e:
        raise SpecError(f"-S {text}: unknown field {e.args[0]!r}") from None
    return _set(doc, path, value), ".".join(path), raw


def _safe_resolve(key: str):
    try:
        return resolve_axis(key)
    except KeyError:
        return None


def read_spec_text(p: Path) -> str:
    """A spec file's text, or one line saying why it cannot be read."""
    if not p.is_file():
        raise SpecError(f"{p}: {'not a regular file' if p.exists() else 'no such spec file'}")
    try:
        if p.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{p}: {p.stat().st_size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,}")
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError(f"{p}: cannot read the spec ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def load_spec(path: str | Path | None, overrides: list[str] = ()) -> tuple[Plan, Source]:
    """Read, override, validate and expand a spec file (None = the built-in defaults)."""
    if path is None:
        name, text = "<defaults>", "{}"
    else:
        text, name = read_spec_text(Path(path)), Path(path).name
    doc, node = parse_yaml(text, name)
    if doc is None:
        raise SpecError(f"{name}: the spec is empty (see experiments.yaml for a complete one)")
    if not isinstance(doc, dict):
        raise SpecError(f"{name}:1 spec: expected a mapping at the top level")
    src = Source(name, doc, node)
    for text_ in overrides:
        doc, key, raw = apply_override(doc, text_)
        src.overrides[key] = raw
    src.doc = doc
    return expand(src), src


def json_schema() -> dict:
    """JSON Schema of a spec file: every RunSpec field plus `sweep`."""
    schema = RunSpec.model_json_schema()
    schema["title"] = "specdb experiment spec"
    schema["properties"]["sweep"] = {
        "type": "object",
        "description": "Axes: a dotted field path (or optimizer, ffn_mult, seed) mapped to a list of "
                       "values; axes multiply. `zip` holds groups of axes that move together.",
        "properties": {"zip": {"type": "array", "items": {"type": "object",
                                                           "additionalProperties": {"type": "array"}}}},
        "additionalProperties": {"type": "array", "minItems": 1},
    }
    return schema
