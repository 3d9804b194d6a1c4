"""Every benchmark script imports (a renamed import is caught here, not when someone next needs a
figure), and the scale benchmark's smoke run finishes with its passes equal to one pass."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # imports torch, Ray, the web stack; the smoke run starts processes

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_each_benchmark_imports(path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts run their work under `if __name__ == "__main__"`
    assert callable(getattr(module, "main", None)) or module.__doc__


def test_the_scale_benchmarks_smoke_run_measures_and_projects():
    out = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick"], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert "top eigenvalues equal bitwise" in out.stdout and "PROJECTION (not measured)" in out.stdout
    assert "llama-8b" in out.stdout and "one H200" in out.stdout


def test_the_gpu_check_script_parses_and_carries_versions_the_project_accepts():
    """benchmarks/gpu_checks.sh is run only where a device is lent: its syntax is checked here, and
    the DuckDB and Pydantic it carries there satisfy the project's own requirements."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    pins = dict(re.findall(r"([a-z][a-z-]+)==([0-9.]+)", script.read_text().split("WHEELS=(", 1)[1].split(")", 1)[0]))
    assert {"duckdb", "pydantic", "pydantic-core"} <= set(pins)
    wanted = {r.name: r for r in map(Requirement, tomllib.loads((root / "pyproject.toml").read_text())["project"]
                                     ["dependencies"])}
    for name in ("duckdb", "pydantic"):
        assert wanted[name].specifier.contains(pins[name]), (name, pins[name], str(wanted[name]))
