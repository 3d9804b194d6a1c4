"""Where a spec comes from: YAML with line numbers and bounds, and errors that name file:line.

Every problem becomes a SpecError of one line: `experiments.yaml:12 model.ffn_mult: …`, or
`-S key=value …` when a command-line override caused it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from spectraldb.errors import SpecError
from spectraldb.spec.models import RunSpec, cross_checks
from spectraldb.spec.optimizers import OPTIMIZER_NAMES

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; anything larger is a mistake or an attack
MAX_YAML_NODES = 100_000  # after alias expansion (a 1 KB alias bomb expands to billions)
MAX_YAML_DEPTH = 64


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


def check_run(doc: dict) -> tuple[RunSpec | None, tuple[tuple, str] | None]:
    """(run, None) for a valid run document, else (None or the run, (location, message))."""
    try:
        run = RunSpec.model_validate(doc)
    except ValidationError as exc:
        return None, _first_error(exc, doc)
    return run, cross_checks(run)


def validate_run(doc: dict, src: Source, value_at: tuple | None = None, key: tuple = ()) -> RunSpec:
    """Validate one run document; with `value_at` (the YAML path of a sweep value whose field
    path is `key`), errors point at that sweep value rather than at the base field."""
    run, problem = check_run(doc)
    if problem is None:
        return run
    loc, msg = problem
    if value_at is None:
        raise SpecError(f"{src.where(loc)} {fmt_path(loc) or 'spec'}: {msg}")
    rest = loc[len(key):] if loc[: len(key)] == key else ()
    raise SpecError(f"{src.where(value_at + rest)} {fmt_path(value_at + rest)}: {msg}")


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
    except (ValueError, OverflowError, TypeError) as exc:  # e.g. a 5,000-digit integer
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
                if not isinstance(k, yaml.ScalarNode):  # `{[1]: x}`: Python cannot even build it
                    raise SpecError(f"{name}:{k.start_mark.line + 1} {fmt_path(path) or 'spec'}: "
                                    "a key must be a plain name, not a list or mapping")
                if k.value in keys:
                    raise SpecError(f"{name}:{k.start_mark.line + 1} {fmt_path(path + (k.value,))}: duplicate key")
                keys.add(k.value)
                stack.append((v, path + (k.value,)))
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
