"""The probe under torch.compile (issue 29, part 3): compiled code never re-checks module hooks,
so the probe runs the measured forwards eagerly; the compiled graphs stay as they are."""

import numpy as np
import torch

from tests.conftest import tiny_model
from workers.probe import attach


def spectra(model, ids):
    probe = attach(model, strata=("all",), min_tokens=2)
    with torch.no_grad(), probe.measuring(ids):
        model.hidden(ids)
    return {(r.layer, r.site): r.eigenvalues for r in probe.compute()}


def test_compiled_blocks_are_measured_as_eager_ones_and_never_recompile():
    from torch._dynamo.utils import counters

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    eager = spectra(tiny_model(), ids)
    model = tiny_model()
    torch._dynamo.reset()
    for block in model.transformer.h:  # as torchtitan compiles: each block in place, one graph
        block.compile(fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled_out = model.hidden(ids)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the blocks did compile
    got = spectra(model, ids)
    assert set(got) == {(layer, site) for layer in (0, 1) for site in ("pre", "post")}  # every layer recorded
    for key, want in eager.items():
        assert np.array_equal(got[key], want), key  # the eager forward's own numbers
    with torch.no_grad():
        again = model.hidden(ids)  # a step between measurements runs the compiled graph, unchanged
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(again, compiled_out, rtol=0, atol=0)
