"""The probe's collectives under torch.distributed: exact reductions of streaming moments.

Unsharded, every rank holds every accumulator and `reduce_across_ranks` pools them at the end
(count, mean, centred scatter gathered and merged in rank order: exact). Sharded, each layer ×
site has one owner rank, and `fold_to_owner` reduces every rank's chunk onto it as it is made.
"""

from __future__ import annotations

import torch

from workers.extract import StreamingCovariance, gram


def _world(group=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _rank(group=None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


def gather_features(act: torch.Tensor, group) -> torch.Tensor:
    """A tensor-parallel rank's local slice of the FFN features, gathered along the feature
    dimension in rank order: the whole activation, the same on every rank of `group` (a column-
    parallel projection's output columns, and a row-parallel one's input, are split in rank order)."""
    import torch.distributed as dist

    act = act.detach().contiguous()
    parts = [torch.empty_like(act) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, act, group=group)
    return torch.cat(parts, dim=-1)


GATHER_BYTES = 1 << 28  # the most one all_gather sends per rank: bounds the gathered copies' memory


def reduce_across_ranks(accumulators, group=None):
    """The exact pooled accumulators of every rank's (count, mean, centred scatter), merged in rank
    order, so every rank holds the same result. Takes one StreamingCovariance or a dict of them
    (the same keys on every rank); a dict's moments travel in as few all_gathers as GATHER_BYTES
    allows (one per measured step at small widths; per-call latency dominated before)."""
    import torch.distributed as dist

    if isinstance(accumulators, StreamingCovariance):
        return reduce_across_ranks({0: accumulators}, group)[0]
    world = dist.get_world_size(group)
    keys = sorted(accumulators)
    out, batch, size = {}, [], 0
    for key in keys:
        dim = accumulators[key].dim
        batch.append(key)
        size += 8 * (1 + dim + dim * dim)
        if size >= GATHER_BYTES:
            out.update(_gather_merge(accumulators, batch, world, group))
            batch, size = [], 0
    if batch:
        out.update(_gather_merge(accumulators, batch, world, group))
    return out


def _gather_merge(accumulators: dict, keys: list, world: int, group) -> dict:
    import torch.distributed as dist

    parts = []
    for key in keys:
        cov = accumulators[key]
        parts += [torch.tensor([float(cov.n)], dtype=torch.float64, device=cov.mean.device), cov.mean,
                  cov.m2.reshape(-1)]
    flat = torch.cat(parts)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=group)
    out = {}
    for key in keys:
        cov = accumulators[key]
        out[key] = StreamingCovariance(cov.dim, cov.accumulate, cov.device)
    for theirs in gathered:  # rank order
        offset = 0
        for key in keys:
            dim = out[key].dim
            part = StreamingCovariance(dim, out[key].accumulate, out[key].device)
            part.n = int(theirs[offset].item())
            part.mean = theirs[offset + 1:offset + 1 + dim]
            part.m2 = theirs[offset + 1 + dim:offset + 1 + dim + dim * dim].view(dim, dim)
            offset += 1 + dim + dim * dim
            out[key].merge(part)
    return out


def fold_to_owner(owned: list, needed: tuple, parts, owner: int, group=None) -> None:
    """Sharded: the chunk's count and mean over every rank (one all_reduce of D+1 per part), each
    rank's scatter about that mean summed onto the owner (one reduce of D×D per part):
    Σ_r (X_r−μ)ᵀ(X_r−μ) is the pooled chunk's centred scatter, exactly. `owned`: the owner's
    accumulator of each needed part (None on the other ranks). Every rank runs the same forwards,
    so the collectives meet in the same order."""
    import torch.distributed as dist

    dim = parts[0].shape[1]
    sums = torch.zeros(len(needed), dim + 1, dtype=torch.float64, device=parts[0].device)
    for j, s in enumerate(needed):
        sums[j, 0] = parts[s].shape[0]
        sums[j, 1:] = parts[s].sum(0, dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    dst = dist.get_global_rank(group, owner) if group is not None else owner
    for j, s in enumerate(needed):
        n = int(sums[j, 0].item())
        if not n:
            continue  # no rank saw a position of this part: every rank skips alike
        mean = sums[j, 1:] / n
        rows = parts[s]
        scatter = gram(rows - mean.to(rows.dtype)).double().contiguous() if rows.shape[0] else \
            torch.zeros(dim, dim, dtype=torch.float64, device=rows.device)
        dist.reduce(scatter, dst=dst, group=group)  # in place: the owner's becomes the sum
        if owned[j] is not None:
            owned[j].fold_moments(n, mean, scatter)
