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

# (family, first projection, down-projection, also required, gated): children of one module.
# A gated first projection named in FUSED outputs [gate | up]: `pre` is its first half.
FUSED = ("gate_up_proj",)
SITE_FAMILIES = (
    ("c_fc/c_proj: specdb's GPT, nanoGPT, HF GPT-2", "c_fc", "c_proj", (), False),
    ("dense_h_to_4h/dense_4h_to_h: GPT-NeoX, Pythia", "dense_h_to_4h", "dense_4h_to_h", (), False),
    ("gate_proj/up_proj/down_proj: Llama, Mistral, Qwen2, OLMo-hf", "gate_proj", "down_proj", ("up_proj",), True),
    ("gate_up_proj/down_proj: Phi-3 (gate and up fused, gate first)", "gate_up_proj", "down_proj", (), True),
    ("w1/w3/w2: torchtitan Llama (feed_forward)", "w1", "w2", ("w3",), True),
    ("fc_1/fc_2/proj: litgpt LLaMAMLP", "fc_1", "proj", ("fc_2",), True),
    ("fc/proj: litgpt GptNeoxMLP", "fc", "proj", (), False),
    ("wi_0/wi_1/wo: T5 v1.1, T5-Efficient (gated DenseReluDense)", "wi_0", "wo", ("wi_1",), True),
    ("wi/wo: T5 (DenseReluDense)", "wi", "wo", (), False),
)


class ProbeError(ValueError):
    """A model or input the probe cannot measure: one line that says what it saw."""


@dataclass(frozen=True)
class Site:
    layer: int
    pre: str      # the module whose output is `pre`
    post: str     # the module whose input is `post`
    gated: bool
    fused: bool = False  # `pre`'s module outputs [gate | up] (FUSED): the gate is its first half


def find_sites(model: torch.nn.Module, patterns: tuple[str, str] | None = None, gated: bool = False) -> list[Site]:
    """The FFN of every block, in module order, each with its layer id (`layer_ids`). `patterns`
    (two regular expressions matching full module names: the first projection, the
    down-projection; `gated` says whether the first is a gate) covers any other model."""
    names = [name for name, _ in model.named_modules()]
    if patterns is not None:
        pre = [n for n in names if re.fullmatch(patterns[0], n)]
        post = [n for n in names if re.fullmatch(patterns[1], n)]
        if not pre or len(pre) != len(post):
            raise ProbeError(f"patterns {patterns[0]!r}, {patterns[1]!r} match {len(pre)} and {len(post)} modules; "
                             "they must match one module each per block")
        found = [(a, b, gated) for a, b in zip(pre, post)]
    else:
        found = []
        for name, module in model.named_modules():
            children = dict(module.named_children())
            for _, first, down, also, is_gated in SITE_FAMILIES:
                if first in children and down in children and all(c in children for c in also):
                    prefix = f"{name}." if name else ""
                    found.append((prefix + first, prefix + down, is_gated))
                    break
    sites = [Site(layer, a, b, g, g and a.rsplit(".", 1)[-1] in FUSED)
             for layer, (a, b, g) in zip(layer_ids([a for a, _, _ in found]), found)]
    if not sites:
        seen = ", ".join(n for n in names[1:13] if n) or "none"
        raise ProbeError(f"no FFN found in {type(model).__name__}: looked for "
                         f"{'; '.join(f[0].split(':')[0] for f in SITE_FAMILIES)} (modules seen: {seen}, …); "
                         "pass patterns=(FIRST_PROJECTION_REGEX, DOWN_PROJECTION_REGEX)")
    return sites


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
    for attr in ("out_features", "nf"):
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
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features
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
