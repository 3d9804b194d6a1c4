"""Which stratum each measured position belongs to: the table of every token id's stratum, and
the labels of one batch's positions (padding left out, token budgets applied) in the order the
probe folds them."""

from __future__ import annotations

from typing import NamedTuple

import math

import numpy as np
import torch

from contract.records import Spectrum
from contract.sizes import frequency_strata
from contract.vocabulary import STRATA_SCOPES
from workers.collectives import _world
from workers.extract import StreamingCovariance
from workers.sites import ProbeError

MEASURED = ("head", "mid", "tail")  # stratum index 0, 1, 2 of a token-strata table
REST = 3  # positions past the strata's budget that still count toward `all` (measuring's all_limit)


def strata_table(counts=None, *, strata_of_ids=None, scope: str = "global", group=None) -> torch.Tensor:
    """Stratum (0 head, 1 mid, 2 tail) of every token id: from a token-count table (the study's
    frequency rule, contract.sizes.frequency_strata) or given directly. Under torch.distributed,
    `scope` `global` sums the ranks' counts first; `rank0_local` uses rank 0's counts everywhere."""
    if scope not in STRATA_SCOPES:
        raise ProbeError(f"strata scope: expected one of {', '.join(STRATA_SCOPES)}, got {scope!r}")
    if strata_of_ids is not None:
        return torch.as_tensor(np.asarray(strata_of_ids), dtype=torch.int64)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or not counts.size or not np.isfinite(counts).all() or (counts < 0).any():
        raise ProbeError(f"token counts: expected one finite count ≥ 0 per token id (got shape {counts.shape}, "
                         f"{int((~np.isfinite(counts)).sum())} non-finite, {int((counts < 0).sum())} negative)")
    counts = torch.tensor(counts)  # a copy: the reduction must not touch the caller's table
    if _world(group) > 1:
        import torch.distributed as dist

        if scope == "global":
            dist.all_reduce(counts, group=group)
        else:
            dist.broadcast(counts, src=0, group=group)
    return torch.from_numpy(frequency_strata(counts.numpy()).astype(np.int64))


class Labels(NamedTuple):
    shape: tuple          # input_ids' shape
    positions: int        # every position, padded ones included
    order: torch.Tensor   # the counted positions sorted by stratum (stable): 0, 1, 2, then REST
    counts: list          # how many of each (head, mid, tail, REST)
    n_pad: int            # positions left out (padding, past the budgets)
    counted: int


def label(input_ids, token_strata: torch.Tensor | None, attention_mask=None, limit: int | None = None,
          all_limit: int | None = None) -> Labels:
    """The positions of `input_ids` (batch × time, row-major) labelled by stratum; positions with
    attention_mask 0 left out; with `limit` only the first `limit` others count toward the strata,
    and with `all_limit` (≥ `limit`) the positions after those, up to `all_limit`, toward `all`
    alone. Without a table every position counts as `all` only."""
    ids = torch.as_tensor(input_ids)
    if token_strata is None:
        labels = torch.zeros(ids.numel(), dtype=torch.int64, device=ids.device)
    else:
        if ids.numel() and int(ids.max()) >= token_strata.numel():
            raise ProbeError(f"token strata: the table covers {token_strata.numel()} token ids but the input "
                             f"holds id {int(ids.max())}; build it from this model's tokenizer")
        labels = token_strata[ids].reshape(-1)
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask, device=labels.device).reshape(-1)
        if mask.numel() != labels.numel():
            raise ProbeError(f"attention_mask: {mask.numel()} positions, input_ids {labels.numel()}")
        labels = torch.where(mask.bool(), labels, torch.full_like(labels, -1))
    if all_limit is not None and (limit is None or all_limit < limit):
        raise ProbeError(f"all_limit: {all_limit} needs a limit no larger than it (limit {limit})")
    if limit is not None:  # token budgets: the strata's first `limit` unpadded positions, then `all`'s
        valid = labels >= 0
        seen = torch.cumsum(valid.long(), 0)
        labels = torch.where(valid & (seen > max(0, limit)), REST, labels)
        labels = torch.where(valid & (seen > max(0, limit if all_limit is None else all_limit)), -1, labels)
    if attention_mask is not None or limit is not None:
        n_pad = int((labels < 0).sum())
        kept = labels[labels >= 0]
    else:
        n_pad, kept = 0, labels
    order = torch.argsort(labels, stable=True)[n_pad:]  # padded positions (−1) sort first
    counts = torch.bincount(kept, minlength=REST + 1).tolist()
    return Labels(tuple(ids.shape), labels.numel(), order, counts, n_pad, sum(counts))


def by_stratum(parts: dict, strata, min_tokens: int, layer: int, site: str) -> list[tuple[Spectrum, object]]:
    """One (record, covariance) per stratum of a layer × site, from its accumulator parts (0 head,
    1 mid, 2 tail, REST): `all` merges every part and is never skipped for want of tokens
    (protocol 3); a stratum under its floor, max(min_tokens, D/4, 2) tokens, gets None."""
    out = []
    for stratum in strata:
        if stratum == "all":
            first = next(iter(parts.values()))
            cov = StreamingCovariance(first.dim, first.accumulate, first.device)
            for part in parts.values():
                cov.merge(part)
            floor = 2
        else:
            cov = parts[MEASURED.index(stratum)]
            floor = max(min_tokens, math.ceil(cov.dim / 4), 2)
        rec = Spectrum.skipped(step=0, layer=layer, site=site, stratum=stratum, n_tokens=cov.n, n_dim=cov.dim)
        out.append((rec, cov if cov.n >= floor else None))
    return out
