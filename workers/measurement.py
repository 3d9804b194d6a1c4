"""One measured step of specdb's own GPT, through the one probe (workers.probe): the tokens run
`chunk` sequences at a time, once per pass; `accumulate` returns what `workers.extract.decompose`
needs (the loop hands that to a background thread), `measure` does both at once.
"""

from __future__ import annotations

import torch

from contract.records import Spectrum
from workers.extract import decompose
from workers.probe import Probe, find_sites


@torch.no_grad()
def accumulate(model, tokens: torch.Tensor, token_strata: torch.Tensor, *, sites, strata, min_tokens: int,
               chunk: int = 64, autocast_dtype=None, precision: str = "fp64", limit: int | None = None,
               all_limit: int | None = None, memory: int | None = None,
               which: str = "full") -> list[tuple[Spectrum, object]]:
    """Run `tokens` (n, T) through specdb's GPT, `chunk` sequences at a time, measured by the one
    probe (workers.probe): what `decompose` needs, as `Probe.select` gives it. The strata count
    the first `limit` positions (row-major), `all` the first `all_limit` (both None: every one).
    With a `memory` budget the accumulators do not fit, the tokens run once per pass."""
    device = tokens.device
    was_training = model.training
    model.eval()
    probe = Probe(model, find_sites(model), token_strata=token_strata, measure=sites, strata=strata,
                  min_tokens=min_tokens, precision=precision, memory=memory, metrics=which)
    width = tokens.shape[1]
    try:
        for part in probe.parts:
            for i in range(0, tokens.shape[0], chunk):
                idx = tokens[i:i + chunk]
                start = i * width  # the budgets are over the whole batch; each chunk gets what is left
                left = None if limit is None else max(0, limit - start)
                left_all = None if all_limit is None else max(0, all_limit - start)
                with probe.measuring(idx, limit=left, all_limit=left_all, part=part), \
                        torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    model.hidden(idx)
    finally:
        model.train(was_training)
    return probe.select()


def measure(model, tokens: torch.Tensor, token_strata: torch.Tensor, *, sites, strata, min_tokens: int,
            chunk: int = 64, autocast_dtype=None, precision: str = "fp64", limit: int | None = None,
            all_limit: int | None = None, memory: int | None = None, which: str = "full") -> list[Spectrum]:
    """Run `tokens` (n, T) through the model and return every requested spectrum (synchronous)."""
    return decompose(accumulate(model, tokens, token_strata, sites=sites, strata=strata, min_tokens=min_tokens,
                                chunk=chunk, autocast_dtype=autocast_dtype, precision=precision, limit=limit,
                                all_limit=all_limit, memory=memory, which=which), precision, which=which)
