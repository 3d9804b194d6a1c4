"""Sweep expansion: axes (dotted paths, aliases, zip groups, optimizer variants) to RunSpecs,
command-line overrides, and loading a spec file into a Plan."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from spectraldb.errors import SpecError
from spectraldb.spec.models import ALIASES, RunSpec
from spectraldb.spec.optimizers import OPTIMIZER_SPECS, _optimizer_shorthand, optimizer_variants
from spectraldb.spec.source import Source, check_run, fmt_path, parse_yaml, read_spec_text, validate_run


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


def _parse_axes(sweep: Any, src: Source, present: bool = True, at: tuple = ("sweep",)) -> list[Axis]:
    """The axes of one sweep mapping (`at`: its place in the spec, for errors)."""
    if not present:
        return []
    if sweep is None or sweep == {}:
        raise SpecError(f"{src.where(at)} {fmt_path(at)}: no axes (list some, or remove `sweep:` for one run)")
    if not isinstance(sweep, dict):
        raise SpecError(f"{src.where(at)} {fmt_path(at)}: expected a mapping of axis: [values], or a list of such "
                        "mappings (sweep blocks, whose runs are united)")
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
                gpath = at + ("zip", gi) if isinstance(values, list) else at + ("zip",)
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
            ypath = at + (key,)
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
                raise SpecError(f"{src.where(at + (name,))} {fmt_path(at + (name,))}: the same field as "
                                f"{fmt_path(at + (seen[k],))}")
            seen[k] = name
    return axes


@dataclass
class Plan:
    spec_name: str
    store: str
    runs: list[RunSpec]
    axes: list[Axis]


def expand(src: Source) -> Plan:
    """Every run of a spec. `sweep:` is a mapping of axes (they multiply), or a list of such
    mappings, sweep blocks, whose runs are united: a run two blocks declare is one run."""
    doc = dict(src.doc)
    present = "sweep" in doc
    sweep = doc.pop("sweep", None)
    base = validate_run(doc, src)
    if isinstance(sweep, list):
        if not sweep:
            raise SpecError(f"{src.where(('sweep',))} sweep: an empty list of sweep blocks (no run to plan)")
        runs, axes, seen = [], [], set()
        for i, block in enumerate(sweep):
            block_axes = _parse_axes(block, src, True, ("sweep", i))
            for run in _expand_block(doc, block_axes, src, ("sweep", i)):
                if run.run_id not in seen:
                    seen.add(run.run_id)
                    runs.append(run)
            axes += block_axes
    else:
        axes = _parse_axes(sweep, src, present)
        runs = _expand_block(doc, axes, src, ("sweep",))
    disambiguate_labels(runs)
    return Plan(base.name, base.store, runs, axes)


def _expand_block(doc: dict, axes: list[Axis], src: Source, at: tuple) -> list[RunSpec]:
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
        run, problem = check_run(d)
        if problem is not None:
            loc, msg = problem
            desc = ", ".join(f"{n}={json.dumps(ax.values[i][j])}" for ax, i in zip(axes, combo)
                             for j, n in enumerate(ax.names))
            raise SpecError(f"{src.where(at)} {fmt_path(at)}: run {len(runs) + 1} ({desc}) {fmt_path(loc)}: {msg}")
        if run.run_id in ids:
            raise SpecError(f"{src.where(at)} {fmt_path(at)}: runs {ids[run.run_id] + 1} and {len(runs) + 1} "
                            "are identical (a repeated value in an axis or zip group)")
        ids[run.run_id] = len(runs)
        runs.append(run)
    return runs


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
        if isinstance(doc.get("sweep"), list):
            raise SpecError(f"-S {text}: this spec's sweep is a list of blocks; set the axis in a block of the file")
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


def read_source(path: str | Path | None, overrides: list[str] = ()) -> Source:
    """A spec file's document (None = the built-in defaults) with its `-S` overrides applied,
    remembering the YAML lines for error messages."""
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
    return src


def load_spec(path: str | Path | None, overrides: list[str] = ()) -> tuple[Plan, Source]:
    """Read, override, validate and expand a spec file (None = the built-in defaults)."""
    src = read_source(path, overrides)
    return expand(src), src
