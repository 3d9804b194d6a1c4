"""Checks that need a CUDA device (skipped elsewhere; the first GPU session runs them)."""

import numpy as np
import pytest
import torch

from spectraldb.spec import load_spec
from tests.conftest import tiny_model, tiny_spec
from workers import measurement, train
from workers.data import prepare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KW = dict(sites=("pre", "post"), strata=("all", "head", "mid", "tail"), min_tokens=20)


def test_the_device_path_equals_the_cpu_path_in_float64():
    model = tiny_model(vocab_size=60, context=8, ffn_mult=2)
    tokens = torch.randint(0, 60, (40, 8))
    strata_of = torch.arange(60) % 3
    cpu = measurement.measure(model, tokens, strata_of, **KW)
    gpu = measurement.measure(model.cuda(), tokens.cuda(), strata_of.cuda(), **KW, autocast_dtype=torch.bfloat16)
    for a, b in zip(cpu, gpu):  # bfloat16 forward on the GPU: the activations differ, not the arithmetic after
        assert b.eigenvalues is not None and np.all(np.diff(b.eigenvalues) <= 0)
        assert b.metrics["hard_rank"] == pytest.approx(a.metrics["hard_rank"], rel=0.05)
    exact = measurement.measure(model, tokens.cuda(), strata_of.cuda(), **KW)  # fp32 forward: same activations
    for a, b in zip(cpu, exact):
        assert b.metrics["hard_rank"] == pytest.approx(a.metrics["hard_rank"], rel=1e-5)


def test_an_overlapped_gpu_run_matches_a_synchronous_one(tmp_path, corpus):
    spec = tmp_path / "g.yaml"
    spec.write_text(tiny_spec(corpus, tmp_path / "g.duckdb", "", steps=7).replace("device: cpu", "device: cuda"))
    run = load_spec(spec)[0].runs[0]
    ds = prepare(run.worker_config().data)
    a, b = train.run(run.worker_config(), ds, overlap=True), train.run(run.worker_config(), ds, overlap=False)
    assert a.status == b.status == "done" and a.device.startswith("cuda")
    for x, y in zip(a.spectra, b.spectra):
        if x.eigenvalues is not None:
            assert x.metrics["hard_rank"] == pytest.approx(y.metrics["hard_rank"], rel=1e-6)
