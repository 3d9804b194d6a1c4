"""The JSON Schema of a spec file (`specdb schema`), for editor completion and validation."""

from __future__ import annotations

from spectraldb.spec.models import RunSpec


def json_schema() -> dict:
    """JSON Schema of a spec file: every RunSpec field plus `sweep`."""
    schema = RunSpec.model_json_schema()
    schema["title"] = "specdb experiment spec"
    block = {
        "type": "object",
        "description": "Axes: a dotted field path (or optimizer, ffn_mult, seed) mapped to a list of "
                       "values; axes multiply. `zip` holds groups of axes that move together.",
        "properties": {"zip": {"type": "array", "items": {"type": "object",
                                                           "additionalProperties": {"type": "array"}}}},
        "additionalProperties": {"type": "array", "minItems": 1},
    }
    schema["properties"]["sweep"] = {
        "description": "One sweep block, or a list of blocks whose runs are united.",
        "oneOf": [block, {"type": "array", "minItems": 1, "items": block}]}
    return schema


def checkpoints_schema() -> dict:
    """JSON Schema of a checkpoints spec (`specdb measure SPEC`)."""
    from spectraldb.spec.checkpoints import CheckpointsSpec

    schema = CheckpointsSpec.model_json_schema()
    schema["title"] = "specdb checkpoints spec"
    return schema
