"""This process's place in a data-parallel run, and the few collectives the training loop needs.

One process is rank 0 of 1 and runs no collective at all. Under torch.distributed (Ray Train
starts the process group: gloo on CPUs, NCCL on GPUs) every rank draws the same global batch and
trains on its contiguous share of rows, so an averaged gradient makes each update the one a single
process would take on the whole batch, up to the order of the sums.
"""

from __future__ import annotations

import torch

BUCKET = 1 << 24  # gradient elements all-reduced at once: bounds the flat copy's memory


class Ranks:
    def __init__(self, distributed: bool = False, device: torch.device | str = "cpu"):
        self.distributed, self.device = distributed, torch.device(device)  # NCCL reduces CUDA tensors only
        if distributed:
            import torch.distributed as dist

            self.dist, self.rank, self.world = dist, dist.get_rank(), dist.get_world_size()
        else:
            self.dist, self.rank, self.world = None, 0, 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (the spec makes batch_size divisible by the world)."""
        share = batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def average_gradients(self, model: torch.nn.Module) -> None:
        """Each gradient becomes the mean of the ranks' (each rank's loss is a mean over an equal share)."""
        if self.world == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads:
            bucket.append(g)
            size += g.numel()
            if size >= BUCKET:
                self._reduce(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce(bucket)

    def _reduce(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
