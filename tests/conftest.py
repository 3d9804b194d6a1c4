"""Shared fixtures: a synthetic corpus (no third-party text), tiny specs, an isolated cache."""

from __future__ import annotations

import contextlib
import os
import shutil
import textwrap
from pathlib import Path

# pytest-xdist's workers share the cores: each BLAS/OpenMP pool (torch's included, read when torch is
# first imported, after this) gets its share, or the pools oversubscribe the cores (the fast loop on
# 2 cores: 29.6-31.8 s with one thread per worker, 36.9-40.6 s with two: benchmarks/tiers.py).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:  # a count you set wins
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, _CORES // _WORKERS)))

import duckdb  # noqa: E402 - after the thread counts above
import numpy as np  # noqa: E402
import pytest

from spectraldb import store
from spectraldb.spec import RunSpec
from tests.builders import evaluations, flat, result, spectrum  # noqa: F401 - flat: the planting API


def make_corpus(folder: Path, n_docs: int = 40, words_per_doc: int = 400, seed: int = 0) -> Path:
    """Zipf-distributed made-up words: a head of frequent words and a long tail, like prose."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(600)]
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        words = rng.choice(lexicon, size=words_per_doc, p=weights)
        (folder / f"doc{d:03d}.txt").write_text(" ".join(words) + ".\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPECDB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("SPECDB_DB", raising=False)


def tiny_spec(corpus: Path, store: Path, sweep: str = "", steps: int = 6, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        name: tiny
        store: {store}
        data: {{corpus: {corpus}, vocab_size: 300, context: 16, heldout_fraction: 0.2}}
        model: {{n_layer: 2, d_model: 16, n_head: 2, ffn_mult: 1}}
        train: {{steps: {steps}, batch_size: 4, seed: 0, device: cpu, eval_tokens: 256}}
        measure: {{every: 3, last_k: 2, tokens: 1024, min_stratum_tokens: 20}}
        """) + extra + sweep


TINY_SWEEP = "sweep:\n  optimizer: [adamw, muon]\n  ffn_mult: [1, 2, 4]\n"


def start_sweep(tmp_path, corpus, steps: int, every: int, seeds=(0, 1, 2)):
    """A `specdb run` of a seed sweep in its own process, returned once it holds the store's writer
    lock: (process, store). The caller communicates with it."""
    import subprocess
    import sys
    import time

    from spectraldb.sidecar.lock import writer_pid

    db, spec = tmp_path / "s.duckdb", tmp_path / "s.yaml"
    spec.write_text(tiny_spec(corpus, db, f"sweep:\n  seed: {list(seeds)}\n", steps=steps)
                    .replace("every: 3", f"every: {every}"))
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "run", str(spec), "--executor", "inline"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while writer_pid(db) is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc, db, spec


@pytest.fixture
def tiny(tmp_path, corpus):
    """Write a tiny 2 optimizers × 3 widths spec; returns (spec path, store path)."""
    store = tmp_path / "tiny.duckdb"
    spec = tmp_path / "tiny.yaml"
    spec.write_text(tiny_spec(corpus, store, TINY_SWEEP))
    return spec, store


# ---------------------------------------------------------------- planted stores (no training)

def planted_run(*, optimizer="adamw", mult=1, seed=0, steps=300, n_head=4, rank_of=None, ppl=50.0, layers=2,
            stratum="all", status="done", n_per_dim=50, strata=None, measured=(100, 200, 300)):
    """One run without training: (its spec, its result). `strata` ({stratum: factor}) writes
    several strata, each with rank_of × factor; otherwise the one `stratum`."""
    run = RunSpec.model_validate({"model": {"d_model": 32, "n_head": n_head, "ffn_mult": mult},
                                  "optimizer": optimizer, "train": {"steps": steps, "seed": seed},
                                  "measure": {"every": 100, "last_k": 2}})
    D = run.model.ffn_width
    spectra = []
    for step in measured:
        for layer in range(layers):
            r = rank_of(D, step, layer)
            for site in ("pre", "post"):
                for st, factor in (strata or {stratum: 1.0}).items():
                    spectra.append(spectrum(step, layer, site, st, flat(min(D, r * factor), D), n_per_dim * D))
    return run, result(status, spectra, evaluations([steps], 3.0, float(np.log(ppl)), ppl))


def put(db, **kw):
    """Plant one run (see `planted_run`) in the store."""
    store.write_run(db, *planted_run(**kw), {})


@contextlib.contextmanager
def planting(db):
    """Plant many runs through one connection in one transaction (store.write_runs, atomic):
    `with planting(db) as plant: plant(mult=2, rank_of=…)`."""
    batch = []
    yield lambda **kw: batch.append((*planted_run(**kw), {}, "", None))
    store.write_runs(db, batch, atomic=True)


def plant_widths(db, mults=(1, 2, 4)):
    """AdamW with hard rank D/4 (β = 1) at each width: the smallest store a fit accepts."""
    with planting(db) as plant:
        for mult in mults:
            plant(mult=mult, rank_of=lambda D, s, l: D / 4)
    return db


MULTS = (1, 2, 4, 8)  # d_model 32 → D = 32 … 256


def query(db, *args, code=0):
    """`specdb query … --format json` through the CLI: (rows, stderr)."""
    import json

    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["query", *args, "--db", str(db), "--format", "json"])
    assert result.exit_code == code, result.output
    return (json.loads(result.stdout) if code == 0 else None), result.stderr


def by_key(rows, *keys):
    return {tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]]: r for r in rows}


@pytest.fixture(scope="module")
def planted_factors(tmp_path_factory):
    """AdamW: hard rank = D/4 (β = 1); Muon: 2·√D (β = 0.5) at steps 200/300 but D/4 at step 100,
    and in layer 1 only D/8 (β = 1 still); both with n_head 4 and 8 (Muon β 0.6 at 8 heads)."""
    db = tmp_path_factory.mktemp("planted") / "v.duckdb"
    with planting(db) as plant:
        for m in MULTS:
            plant(optimizer="adamw", mult=m, rank_of=lambda D, s, l: D / 4)
            plant(optimizer="muon", mult=m, rank_of=lambda D, s, l: D / 4 if s == 100 else 2 * np.sqrt(D))
            plant(optimizer="adamw", mult=m, n_head=8, rank_of=lambda D, s, l: D / 4)
            plant(optimizer="muon", mult=m, n_head=8, rank_of=lambda D, s, l: 1.5 * D**0.6)
    return db


# ---------------------------------------------------------------- optimizer configs and a tiny model

def optimizer(name: str, **kw):
    """The typed optimizer record a worker receives (contract/config.py), from the spec's defaults."""
    from spectraldb.spec import RunSpec

    return RunSpec.model_validate({"optimizer": {"name": name, **kw}}).worker_config().optimizer


ADAMW, MUON, NORMUON, DION = optimizer("adamw"), optimizer("muon"), optimizer("normuon"), \
    optimizer("dion", rank_fraction=0.5)


def tiny_model(seed: int = 0, **kw):
    """The one builder of specdb's GPT in tests: seeded, 2 layers, d_model 16 (vocab 64, context 16,
    ffn_mult 4 unless overridden)."""
    import torch

    from workers.model import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": 64, "context": 16, "n_layer": 2, "d_model": 16, "n_head": 2,
                            "ffn_mult": 4, **kw}))


# ---------------------------------------------------------------- servers


def start_server(db, *extra, env=None, preexec_fn=None, token=None):
    """The one way tests start a real `specdb serve`: a free loopback port, returned once
    /api/status answers — (process, base URL). `extra`: more `serve` options."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--db", str(db), "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn,
                            env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    token = token or (extra[extra.index("--token") + 1] if "--token" in extra else None)
    deadline = time.time() + 60
    while True:
        try:
            request = urllib.request.Request(f"{base}/api/status",
                                             headers={"Authorization": f"Bearer {token}"} if token else {})
            urllib.request.urlopen(request, timeout=5).read()
            return proc, base
        except (urllib.error.URLError, ConnectionError):
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)


def stop_server(proc) -> str:
    """Ctrl-C, as a user stops it; its stderr."""
    import signal

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    return err


# ---------------------------------------------------------------- tiers

UNIT = Path(__file__).resolve().parent / "unit"


def pytest_ignore_collect(collection_path, config):
    """`-m unit` collects tests/unit/ alone: importing the other modules (torch, Ray, the service)
    would cost the tier more than its tests take."""
    if config.getoption("markexpr", "").strip() == "unit" and collection_path.suffix == ".py" \
            and UNIT not in collection_path.resolve().parents and collection_path.name != "conftest.py":
        return True
    return None


def pytest_collection_modifyitems(config, items):
    """tests/unit/ is the unit tier (`pytest -m unit`): a module at a time, no training."""
    for item in items:
        if UNIT in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.unit)


def rows(db, sql: str) -> list[tuple]:
    """The rows of one query on a store, read-only (a raw DuckDB connection: what a user's own
    tools would see)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium (Debian's chromium and chromium-driver), its console
    logged."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    assert Path(driver_path).exists(), "chromium-driver is missing (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
