"""Where a model's FFNs are, and what shape a model has: what the probe hooks and a run declares.

Sites (docs/design.md §1): `pre` is the output of the FFN's first projection, `post` the input of
its down-projection. In a gated FFN (Llama family: `down_proj(act(gate_proj(x)) * up_proj(x))`)
`pre` is the gate projection's output, as NerVE measures it — the pre-activation whose
nonlinearity the study follows — and `post` the input of `down_proj`, the product the
down-projection reads: the same two places relative to the nonlinearity as in an ungated FFN.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from contract.memory import default_budget


@dataclass(frozen=True)
class Family:
    """Children of one module that make an FFN. `gated` None: read from the module's
    `config.gated_linear_unit` (Megatron). `fused`: the first projection outputs [gate | up] and
    `pre` is the gate, its first half — of the whole output (`whole`: Phi-3), or of each
    tensor-parallel rank's local output (`per_rank`: Megatron interleaves them per rank).
    `sequence_first`: its activations are [s, b, h] (Megatron), not [b, s, h]."""
    name: str
    first: str
    down: str
    also: tuple = ()
    gated: bool | None = False
    fused: str = ""
    sequence_first: bool = False


SITE_FAMILIES = (
    Family("c_fc/c_proj: specdb's GPT, nanoGPT, HF GPT-2", "c_fc", "c_proj"),
    Family("dense_h_to_4h/dense_4h_to_h: GPT-NeoX, Pythia", "dense_h_to_4h", "dense_4h_to_h"),
    Family("gate_proj/up_proj/down_proj: Llama, Mistral, Qwen2, OLMo-hf", "gate_proj", "down_proj", ("up_proj",), True),
    Family("gate_up_proj/down_proj: Phi-3 (gate and up fused, gate first)", "gate_up_proj", "down_proj", (), True,
           "whole"),
    Family("w1/w3/w2: torchtitan Llama (feed_forward)", "w1", "w2", ("w3",), True),
    Family("linear_fc1/linear_fc2: Megatron-core MLP (sequence-first; gated per config, gate and up fused per "
           "tensor-parallel rank)", "linear_fc1", "linear_fc2", (), None, "per_rank", True),
    Family("fc_1/fc_2/proj: litgpt LLaMAMLP", "fc_1", "proj", ("fc_2",), True),
    Family("fc/proj: litgpt GptNeoxMLP", "fc", "proj"),
    Family("wi_0/wi_1/wo: T5 v1.1, T5-Efficient (gated DenseReluDense)", "wi_0", "wo", ("wi_1",), True),
    Family("wi/wo: T5 (DenseReluDense)", "wi", "wo"),
)


class ProbeError(ValueError):
    """A model or input the probe cannot measure: one line that says what it saw."""


@dataclass(frozen=True)
class Site:
    layer: int
    pre: str      # the module whose output is `pre`
    post: str     # the module whose input is `post`
    gated: bool
    fused: str = ""               # Family.fused: where `pre` is the first half of a [gate | up] output
    sequence_first: bool = False  # activations are [s, b, h]


def find_sites(model: torch.nn.Module, patterns: tuple[str, str] | None = None, gated: bool = False,
               sequence_first: bool = False, stack: str | None = None) -> list[Site]:
    """The FFN of every block, in module order, each with its layer id (`layer_ids`). `patterns`
    (two regular expressions matching full module names: the first projection, the
    down-projection; `gated` says whether the first is a gate, `sequence_first` whether the
    activations are [s, b, h]) covers any other model. `stack` keeps one layer set of a model that
    has several (T5's `encoder` and `decoder`: `stacks`), numbered from its own layer ids."""
    names = [name for name, _ in model.named_modules()]
    if patterns is not None:
        pre = [n for n in names if re.fullmatch(patterns[0], n)]
        post = [n for n in names if re.fullmatch(patterns[1], n)]
        if not pre or len(pre) != len(post):
            raise ProbeError(f"patterns {patterns[0]!r}, {patterns[1]!r} match {len(pre)} and {len(post)} modules; "
                             "they must match one module each per block")
        found = [(a, b, gated, "", sequence_first) for a, b in zip(pre, post)]
    else:
        found = []
        for name, module in model.named_modules():
            children = dict(module.named_children())
            for family in SITE_FAMILIES:
                if family.first in children and family.down in children and all(c in children for c in family.also):
                    prefix = f"{name}." if name else ""
                    is_gated = family.gated if family.gated is not None else \
                        bool(getattr(getattr(module, "config", None), "gated_linear_unit", False))
                    found.append((prefix + family.first, prefix + family.down, is_gated,
                                  family.fused if is_gated else "", family.sequence_first))
                    break
    if stack is not None:
        named = stacks([row[0] for row in found])
        if stack not in named:
            raise ProbeError(f"stack: {stack!r} is not one of this model's layer sets "
                             f"({', '.join(sorted(set(named))) if any(named) else 'it has one, unnamed'})")
        found = [row for row, name in zip(found, named) if name == stack]
    sites = [Site(layer, *row) for layer, row in zip(layer_ids([row[0] for row in found]), found)]
    if not sites:
        seen = ", ".join(n for n in names[1:13] if n) or "none"
        raise ProbeError(f"no FFN found in {type(model).__name__}: looked for "
                         f"{'; '.join(f.name.split(':')[0] for f in SITE_FAMILIES)} (modules seen: {seen}, …); "
                         "pass patterns=(FIRST_PROJECTION_REGEX, DOWN_PROJECTION_REGEX)")
    return sites


def stacks(names: list[str]) -> list[str]:
    """Each FFN's layer set: the first component where the module names part that is not a
    number (T5's `encoder.block.0…`, `decoder.block.0…` → encoder, decoder); "" for every FFN of a
    model with one stack (its names part first at the layer number)."""
    split = [name.split(".") for name in names]
    depth = 0
    while all(len(parts) > depth for parts in split) and len({parts[depth] for parts in split}) == 1:
        depth += 1
    out = [parts[depth] if len(parts) > depth else "" for parts in split]
    if len(set(out)) < 2 or any(re.fullmatch("[0-9]+", part) for part in out):
        return [""] * len(names)
    return out


def layer_ids(names: list[str]) -> list[int]:
    """Each FFN's layer id: the first number in its module's name (`model.layers.7.mlp.gate_proj`
    → 7), so a pipeline stage holding blocks 8–15 measures layers 8–15; when some name has no
    number or two share one (T5's encoder and decoder blocks), their order instead (0, 1, …)."""
    ids = []
    for name in names:
        number = next((int(part) for part in name.split(".") if re.fullmatch("[0-9]{1,9}", part)), None)
        ids.append(number)
    if None in ids or len(set(ids)) != len(ids):
        return list(range(len(names)))
    return ids


CONFIG_NAMES = {"d_model": ("hidden_size", "n_embd", "d_model"), "n_layer": ("num_hidden_layers", "n_layer"),
                "n_head": ("num_attention_heads", "n_head"), "context": ("max_position_embeddings", "n_positions")}


def projection_width(module: torch.nn.Module) -> int:
    """Output width of an FFN's first projection: nn.Linear, HF's Conv1D, or a weight's shape."""
    for attr in ("out_features", "nf", "output_size"):  # nn.Linear, HF Conv1D, Megatron (the whole width)
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return int(module.weight.shape[0])


def pre_width(module: torch.nn.Module, site: Site) -> int:
    """The width of `pre`: the first projection's output, half of it where gate and up are fused."""
    width = projection_width(module)
    return width // 2 if site.fused else width


def input_width(module: torch.nn.Module) -> int:
    """Input width of an FFN's down-projection: nn.Linear, HF's Conv1D (weight in × out), or a
    weight's shape."""
    for attr in ("in_features", "input_size"):  # nn.Linear, Megatron (the whole width)
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    if isinstance(getattr(module, "nf", None), int):
        return int(module.weight.shape[0])
    return int(module.weight.shape[1])


def declared_widths(model: torch.nn.Module, sites: list[Site]) -> dict:
    """(layer, site) → the width its module declares (None where it declares none): what a
    measured activation must have, or the FFN is sharded across ranks."""
    modules = dict(model.named_modules())
    out = {}
    for site in sites:
        for name, module, width in (("pre", modules[site.pre], lambda m, site=site: pre_width(m, site)),
                                    ("post", modules[site.post], input_width)):
            try:
                out[(site.layer, name)] = width(module)
            except (AttributeError, IndexError, TypeError):
                out[(site.layer, name)] = None
    return out


def model_shape(model: torch.nn.Module, probe) -> dict:
    """d_model, n_layer, ffn_width (and n_head, context where the config says) of a model: what a
    tracked run or a measured checkpoint declares about it."""
    config = getattr(model, "config", None)
    shape = {}
    for key, names in CONFIG_NAMES.items():
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                shape[key] = value
                break
    modules = dict(model.named_modules())
    shape["ffn_width"] = pre_width(modules[probe.sites[0].pre], probe.sites[0])
    shape.setdefault("n_layer", len(probe.sites))
    if "d_model" not in shape:
        raise ValueError("d_model: not in the model's config; pass d_model=")
    return shape


def model_config(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {}


def device_budget(model: torch.nn.Module) -> int:
    """The default accumulator budget: a share of the memory of the device the model is on."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return default_budget(torch.cuda.get_device_properties(param.device).total_memory)
    return default_budget()
