"""The test tiers themselves: under pytest-xdist each worker's BLAS/OpenMP pools get their share of
the cores (tests/conftest.py), so the workers do not oversubscribe them; a count you set wins."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.slow  # starts pytest with two workers
@pytest.mark.parametrize("asked, want", [(None, max(1, CORES // 2)), (str(CORES), CORES)])
def test_each_xdist_worker_gets_its_share_of_the_threads(tmp_path, asked, want):
    (tmp_path / "conftest.py").write_text("import tests.conftest  # noqa: F401 - the suite's own set-up\n")
    (tmp_path / "test_threads.py").write_text(
        "import os\nimport torch\n\n\n"
        "def test_threads():\n"
        f"    assert os.environ['OMP_NUM_THREADS'] == '{want}' and torch.get_num_threads() == {want}\n")
    env = {k: v for k, v in os.environ.items()  # none of this (outer) run's own worker settings
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") and not k.startswith("PYTEST_")}
    if asked:
        env["OMP_NUM_THREADS"] = asked
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:]
    assert "1 passed" in out.stdout
