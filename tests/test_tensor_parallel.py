"""The guard against tensor-parallel FFNs (issue 29, part 1): a sharded activation — a DTensor,
or a local shard narrower than the module's declared width — is refused in one line naming the
module and the widths, never measured as if it were the whole FFN."""

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


def _tp_rank(rank, world, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = tiny_model()
        for block in model.transformer.h:
            parallelize_module(block.mlp, mesh, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        messages = []
        for measure in (("pre",), ("post",), ("pre", "post")):
            probe = attach(model, strata=("all",), min_tokens=2, measure=measure)
            try:
                with torch.no_grad(), probe.measuring(ids):
                    model.hidden(ids)
                messages.append("measured")
            except ProbeError as exc:
                messages.append(str(exc))
        (out_dir / f"messages-{rank}.txt").write_text("\n".join(messages))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_a_column_and_row_parallel_ffn_is_refused_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_tp_rank, args=(2, tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        pre, post, both = (tmp_path / f"messages-{rank}.txt").read_text().splitlines()
        assert pre.startswith("site pre of layer 0 (transformer.h.0.mlp.c_fc): activations of width 32, but the "
                              "module declares 64"), pre
        assert post.startswith("site post of layer 0 (transformer.h.0.mlp.c_proj): activations of width 32, but "
                               "the module declares 64") or "DTensor" in post, post
        assert both.startswith("site pre of layer 0"), both
