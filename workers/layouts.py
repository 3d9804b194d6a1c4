"""The whole FFN features at a site, in input_ids' order, whatever layout a model keeps them in:
Megatron's (output, bias) pairs and per-rank fused gates, Phi-3's fused gate, tensor-parallel
slices (gathered along the features) and sequence-first [s, b, h] activations. A layout that
cannot be made whole is refused in one line naming the module, never measured as a slice."""

from __future__ import annotations

import torch

from workers.collectives import _rank, _world, gather_features
from workers.sites import ProbeError, Site


def output_of(out):
    """A projection's output: Megatron's linear layers return (output, bias) with the bias not yet
    added (it is fused into the activation), so the pre-activation is their sum."""
    if isinstance(out, (tuple, list)):
        return out[0] if len(out) < 2 or out[1] is None else out[0] + out[1]
    return out


def first_half(out):
    """The gate of a fused [gate | up] output (as the model chunks it)."""
    return out[..., : out.shape[-1] // 2]


def whole_features(where: Site, site: str, act, group, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """The whole features at a site, and (rank, size) of the tensor-parallel group whose ranks now
    hold them alike (each then folds its own share of the positions, so none is counted twice). A
    DTensor carries its own layout (`full_tensor`); a plain local slice is gathered along the
    features within `group` (the probe's `tensor_parallel`), or, where none is declared, left for
    `check_unsharded` to refuse."""
    if site == "pre":
        act = output_of(act)
        if where.fused == "per_rank":
            act = first_half(act)
    if type(act).__name__ == "DTensor":
        group = _dtensor_group(act.device_mesh, group, f"site {site} of layer {where.layer} ({name})")
        act = act.full_tensor()
    elif group is not None and _world(group) > 1:
        act = gather_features(act, group)
    if site == "pre" and where.fused == "whole":
        act = first_half(act)
    return act, ((_rank(group), _world(group)) if group is not None and _world(group) > 1 else (0, 1))


def _dtensor_group(mesh, declared, where: str):
    """The tensor-parallel group of a DTensor activation: its own 1-D mesh. `full_tensor` gathers
    across every mesh dimension, so on a 2-D (data × tensor) mesh each data-parallel rank would
    hold, and count, the whole batch; and a declared group other than the mesh would split the
    positions among the wrong ranks. Both are refused rather than counted twice."""
    import torch.distributed as dist

    if mesh.ndim != 1:
        raise ProbeError(f"{where}: a DTensor on a {mesh.ndim}-D mesh {tuple(mesh.shape)}; parallelize the FFN over "
                         "its 1-D tensor-parallel submesh (parallelize_module(block, mesh['tp'], …)) so only the "
                         "features are sharded")
    own = mesh.get_group()
    if declared is not None and dist.get_process_group_ranks(declared) != dist.get_process_group_ranks(own):
        raise ProbeError(f"{where}: a DTensor on ranks {dist.get_process_group_ranks(own)}, but tensor_parallel= "
                         f"declares ranks {dist.get_process_group_ranks(declared)}; declare its own mesh, or none")
    return own


def check_unsharded(act: torch.Tensor, want: int | None, layer: int, site: str, name: str) -> None:
    """A local slice narrower than the module's declared width is a tensor-parallel FFN nobody
    declared: its covariance would be of a slice of the features, silently."""
    if want is not None and act.shape[-1] != want:
        raise ProbeError(f"site {site} of layer {layer} ({name}): activations of width {act.shape[-1]}, but the "
                         f"module declares {want}: a tensor-parallel (sharded) FFN; pass tensor_parallel= (its "
                         "group) to gather the slices (docs/design.md, tensor parallelism)")


def batch_first(where: Site, site: str, act: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
    """Activations in input_ids' (batch, time) order: a sequence-first [s, b, h] FFN is
    transposed; one that is sequence-first but undeclared is refused, never scrambled (where batch
    and time are equal the declaration alone decides)."""
    if len(shape) != 2 or act.ndim != 3:
        return act
    batch, time = shape
    if where.sequence_first:
        if tuple(act.shape[:2]) != (time, batch):
            raise ProbeError(f"site {site} of layer {where.layer} ({name}): sequence-first activations [s, b, h] "
                             f"should be {time}×{batch}×h for input_ids of {batch}×{time}, got "
                             f"{'×'.join(map(str, act.shape))}")
        return act.transpose(0, 1)
    if batch != time and tuple(act.shape[:2]) == (time, batch):
        raise ProbeError(f"site {site} of layer {where.layer} ({name}): activations are {time}×{batch}×h for "
                         f"input_ids of {batch}×{time}: sequence-first [s, b, h]; pass sequence_first=True")
    return act
