"""What every adapter shares: the model's shape for the run id, and a tap on the root model that
measures the forwards of a chosen step (HF callbacks never see the batch)."""

from __future__ import annotations

import contextlib

import torch

from workers.probe import Probe

CONFIG_NAMES = {"d_model": ("hidden_size", "n_embd", "d_model"), "n_layer": ("num_hidden_layers", "n_layer"),
                "n_head": ("num_attention_heads", "n_head"), "context": ("max_position_embeddings", "n_positions")}


def ffn_width(module: torch.nn.Module) -> int:
    """Output width of an FFN's first projection: nn.Linear, HF's Conv1D, or a weight's shape."""
    for attr in ("out_features", "nf"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return int(module.weight.shape[0])


def model_shape(model: torch.nn.Module, probe: Probe) -> dict:
    """d_model, n_layer, ffn_width (and n_head, context where the config says) of a model."""
    config = getattr(model, "config", None)
    shape = {}
    for key, names in CONFIG_NAMES.items():
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                shape[key] = value
                break
    modules = dict(model.named_modules())
    shape["ffn_width"] = ffn_width(modules[probe.sites[0].pre])
    shape.setdefault("n_layer", len(probe.sites))
    if "d_model" not in shape:
        raise ValueError("d_model: not in the model's config; pass d_model=")
    return shape


def model_config(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {}


class Tap:
    """Measures every forward of `model` while armed: a forward pre-hook reads `input_ids` and
    `attention_mask` (keyword or first argument) and opens the probe's measuring block; a forward
    hook closes it."""

    def __init__(self, model: torch.nn.Module, probe: Probe):
        self.probe, self.armed, self.open = probe, False, contextlib.ExitStack()
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after, always_call=True)]

    def _before(self, module, args, kwargs):
        if not self.armed:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self.open.enter_context(self.probe.measuring(ids, kwargs.get("attention_mask")))
        return None

    def _after(self, module, args, output):
        self.open.close()

    def remove(self) -> None:
        self.open.close()
        for h in self.handles:
            h.remove()
