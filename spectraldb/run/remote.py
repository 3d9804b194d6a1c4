"""Ray objects made on first use, so that importing the driver's modules needs no Ray."""

from __future__ import annotations


class LazyRemote:
    """Defers ray.remote until first use: `factory` builds the remote function or actor class."""

    def __init__(self, factory):
        self.factory, self.obj = factory, None

    def __getattr__(self, name):
        if self.obj is None:
            self.obj = self.factory()
        return getattr(self.obj, name)
