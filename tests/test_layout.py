"""The layering the README promises, checked in fresh interpreters."""

import subprocess
import sys

import pytest


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_library_imports_without_torch_or_ray():
    loaded = modules_after("import spectraldb.store, spectraldb.queries, spectraldb.service, spectraldb.scheduler, "
                           "spectraldb.writer, spectraldb.plots")
    assert not {"torch", "ray"} & loaded


def test_workers_never_import_ray_duckdb_or_pydantic():
    loaded = modules_after("import workers.train, workers.extract, workers.bench")
    assert not {"ray", "duckdb", "pydantic"} & loaded


@pytest.mark.slow
def test_workers_bench_runs_with_torch_alone_and_prints_its_ratios():
    out = subprocess.run([sys.executable, "-m", "workers.bench", "--tokens", "2048", "--repeats", "1", "--skip-share"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for line in ("forward passes alone", "specdb: decompose (batched eigvalsh)", "previous / specdb measure()",
                 "naive / specdb measure()"):
        assert line in out.stdout
