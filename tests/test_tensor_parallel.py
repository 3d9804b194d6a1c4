"""The guard against tensor-parallel FFNs (issue 29, part 1): a sharded activation — a DTensor,
or a local shard narrower than the module's declared width — is refused in one line naming the
module and the widths, never measured as if it were the whole FFN."""

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from workers.probe import ProbeError, attach


def test_a_shard_narrower_than_the_declared_width_is_refused_with_the_module_and_widths():
    model = tiny_model()  # D = 64
    model.transformer.h[1].mlp.c_fc.out_features = 128  # what a column-parallel module says of itself
    probe = attach(model, strata=("all",), min_tokens=2)
    ids = torch.randint(0, 64, (2, 16))
    with pytest.raises(ProbeError) as err, torch.no_grad(), probe.measuring(ids):
        model.hidden(ids)
    assert str(err.value).startswith("site pre of layer 1 (transformer.h.1.mlp.c_fc): activations of width 64, but "
                                     "the module declares 128: a tensor-parallel (sharded) FFN")
    assert "\n" not in str(err.value)
    model.transformer.h[1].mlp.c_fc.out_features = 64
    model.transformer.h[0].mlp.c_proj.in_features = 32
    probe = attach(model, strata=("all",), min_tokens=2)
    with pytest.raises(ProbeError, match=r"site post of layer 0 \(transformer.h.0.mlp.c_proj\): activations of width "
                                         r"64, but the module declares 32"), torch.no_grad(), probe.measuring(ids):
        model.hidden(ids)


IDS = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
STRATA = torch.arange(64) % 3


def _spectra(probe):
    return {(r.layer, r.site, r.stratum): (r.n_tokens, r.eigenvalues, r.metrics) for r in probe.compute()}


def _split_ffns(mesh):
    """The tiny GPT in float64 with every block's FFN split over `mesh` (torch.distributed.tensor):
    c_fc column-parallel, c_proj row-parallel."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = tiny_model().double()
    for block in model.transformer.h:
        parallelize_module(block.mlp, mesh, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
    return model


def _forward(model, probe, ids=IDS):
    with torch.no_grad(), probe.measuring(ids):
        model.hidden(ids)


def _outcome(call) -> str:
    """"measured", or the line the probe refused it with."""
    try:
        call()
        return "measured"
    except ProbeError as exc:
        return str(exc)


def _tp_rank(rank, world, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tests.megatron import MegatronGPT

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = _split_ffns(mesh)
        messages, results = [], {}
        for measure in (("pre",), ("post",), ("pre", "post")):  # nothing declared: a local slice is refused
            probe = attach(model, strata=("all",), min_tokens=2, measure=measure)
            messages.append(_outcome(lambda: _forward(model, probe)))
        for shard in (False, True):  # declared: the slices are gathered into the whole features
            probe = attach(model, token_strata=STRATA, min_tokens=2, tensor_parallel=mesh, shard=shard)
            for ids in (IDS[:3], IDS[3:]):  # two forwards merge
                _forward(model, probe, ids)
            results[f"torch shard={shard}"] = _spectra(probe)
        # Megatron's layout: no DTensor, gate and up fused per rank, sequence-first
        megatron = MegatronGPT(gated=True, tp_rank=rank, tp_size=world, group=dist.group.WORLD).double()
        probe = attach(megatron, token_strata=STRATA, min_tokens=2, tensor_parallel=dist.group.WORLD)
        with torch.no_grad(), probe.measuring(IDS):
            megatron(IDS)
        results["megatron"] = _spectra(probe)
        (out_dir / f"messages-{rank}.txt").write_text("\n".join(messages))
        (out_dir / f"refusals-{rank}.txt").write_text("\n".join(_dtensor_refusals(world)))
        torch.save(results, out_dir / f"spectra-{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _dtensor_refusals(world) -> list[str]:
    """A DTensor whose own mesh is not the declared group, and one on a 2-D mesh (full_tensor would
    hand every data-parallel rank the whole batch): each refused, never counted twice."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from workers.layouts import whole_features
    from workers.sites import Site

    solo = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))  # each rank its own TP group
    model = _split_ffns(solo["tp"])
    probe = attach(model, strata=("all",), min_tokens=2, measure=("post",), tensor_parallel=dist.group.WORLD)
    refusals = [_outcome(lambda: _forward(model, probe))]
    grid = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    act = DTensor.from_local(torch.ones(2, 3, 4, dtype=torch.float64), grid, [Replicate(), Shard(2)])
    site = Site(0, "c_fc", "c_proj", False)
    return refusals + [_outcome(lambda: whole_features(site, "post", act, declared, "mlp.c_proj"))
                       for declared in (None, grid["tp"].get_group())]


@pytest.mark.slow  # two processes
def test_tensor_parallel_ffns_are_refused_undeclared_and_equal_the_unsharded_model_declared(tmp_path):
    """Column-parallel c_fc, row-parallel c_proj (torch.distributed.tensor) and Megatron's own
    layout, over 2 gloo ranks: a local slice nobody declared is refused on every rank; declared,
    every stratum's spectrum equals the unsharded model's to 1e-12 (float64 forwards: the
    row-parallel sum only reorders additions), unsharded and sharded accumulators alike."""
    import torch.multiprocessing as mp

    from tests.megatron import MegatronGPT

    mp.spawn(_tp_rank, args=(2, tmp_path), nprocs=2, join=True)
    want = {}
    model = tiny_model().double()
    probe = attach(model, token_strata=STRATA, min_tokens=2)
    with torch.no_grad(), probe.measuring(IDS):
        model.hidden(IDS)
    want["torch"] = _spectra(probe)
    megatron = MegatronGPT(gated=True).double()
    probe = attach(megatron, token_strata=STRATA, min_tokens=2)
    with torch.no_grad(), probe.measuring(IDS):
        megatron(IDS)
    want["megatron"] = _spectra(probe)
    for rank in (0, 1):
        pre, post, both = (tmp_path / f"messages-{rank}.txt").read_text().splitlines()
        assert pre.startswith("site pre of layer 0 (transformer.h.0.mlp.c_fc): activations of width 32, but the "
                              "module declares 64: a tensor-parallel (sharded) FFN"), pre
        assert post == "measured", post  # c_proj's input arrives as a DTensor: it carries its own layout
        assert both.startswith("site pre of layer 0"), both
        mismatch, *grid = (tmp_path / f"refusals-{rank}.txt").read_text().splitlines()
        assert mismatch == (f"site post of layer 0 (transformer.h.0.mlp.c_proj): a DTensor on ranks [{rank}], but "
                            "tensor_parallel= declares ranks [0, 1]; declare its own mesh, or none"), mismatch
        assert grid == ["site post of layer 0 (mlp.c_proj): a DTensor on a 2-D mesh (1, 2); parallelize the FFN "
                        "over its 1-D tensor-parallel submesh (parallelize_module(block, mesh['tp'], …)) so only the "
                        "features are sharded"] * 2, grid
        got = torch.load(tmp_path / f"spectra-{rank}.pt", weights_only=False)
        for name, spectra in got.items():
            reference = want[name.split()[0]]
            assert spectra.keys() == reference.keys() and len(spectra) == 2 * 2 * 4
            for key, (n, eig, metrics) in spectra.items():
                n0, eig0, metrics0 = reference[key]
                assert n == n0 and eig0 is not None and len(eig) == len(eig0), (name, key)  # none skipped
                assert np.max(np.abs(np.asarray(eig) - eig0)) <= 1e-12 * np.max(eig0), (name, key)
                assert metrics == pytest.approx(metrics0, rel=1e-12), (name, key)
