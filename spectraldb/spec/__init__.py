"""experiments.yaml: strict models, sweep expansion, run ids, and errors that name file:line.

A spec is one run's settings (data, model, train, optimizer, measure, resources) plus a
`sweep:` of axes. Each axis is a dotted path (or an alias: optimizer, ffn_mult, seed) with
a list of values; axes combine as a product, and axes inside one `zip:` group move together.
Expansion yields fully resolved RunSpecs; run_id is a hash of the parts that change results.

  models.py  the pydantic models, defaults, bounds, run ids
  optimizers.py  the optimizer sections, shorthand and sweep variants
  types.py   field types and the strict base section
  source.py  YAML with line numbers and bounds, errors as one line
  sweep.py   axes, overrides, loading a file into a Plan
  schema.py  the JSON Schema
"""

from spectraldb.spec.models import (CheckpointSpec, DataSpec, MeasureSpec, ModelSpec, ResourcesSpec, RunSpec,
                                    TrainSpec, cross_checks)
from spectraldb.spec.optimizers import OPTIMIZER_NAMES, OPTIMIZER_SPECS
from spectraldb.spec.types import INT32_MAX
from spectraldb.spec.schema import json_schema
from spectraldb.spec.source import Source, parse_yaml, validate_run
from spectraldb.spec.sweep import Plan, apply_override, expand, load_spec, resolve_axis

__all__ = ["INT32_MAX", "OPTIMIZER_NAMES", "OPTIMIZER_SPECS", "CheckpointSpec", "DataSpec", "MeasureSpec",
           "ModelSpec", "Plan", "ResourcesSpec", "RunSpec", "Source", "TrainSpec", "apply_override",
           "cross_checks", "expand", "json_schema", "load_spec", "parse_yaml", "resolve_axis", "validate_run"]
