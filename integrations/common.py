"""What every adapter shares: a tap on the root model that measures the forwards of a chosen step
(HF callbacks never see the batch); the model's shape comes from workers.probe."""

from __future__ import annotations

import contextlib

import torch

from workers.probe import Probe

class Tap:
    """Measures every forward of `model` while armed: a forward pre-hook reads `input_ids` and
    `attention_mask` (keyword or first argument) and opens the probe's measuring block; a forward
    hook closes it."""

    def __init__(self, model: torch.nn.Module, probe: Probe, tokens: int | None = None):
        self.probe, self.tokens, self.open = probe, tokens, contextlib.ExitStack()
        self.armed, self.remaining = False, tokens
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after, always_call=True)]

    def _before(self, module, args, kwargs):
        if not self.armed:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self.open.enter_context(self.probe.measuring(ids, kwargs.get("attention_mask"), limit=self.remaining))
        return None

    def _after(self, module, args, output):
        if self.open._exit_callbacks and self.remaining is not None:
            self.remaining -= self.probe.counted
        self.open.close()

    def arm(self, on: bool) -> None:
        """Measure the forwards from now on (a measured step begins: its token budget is fresh)."""
        self.armed, self.remaining = on, self.tokens

    def remove(self) -> None:
        self.open.close()
        for h in self.handles:
            h.remove()
