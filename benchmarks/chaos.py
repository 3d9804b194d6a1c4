"""Chaos soak: many tiny runs on a simulated multi-node Ray cluster while things break.

    python benchmarks/chaos.py --runs 1000 --workdir /tmp/chaos

One undisturbed sweep, then the same sweep on a fresh store while a helper, every few seconds,
kills a random Ray worker process, removes a worker node and adds a new one, or SIGKILLs the
driver and starts it again; reader threads hold the store open read-only meanwhile. At the end
it prints: runs lost (in the spec, not in the store), runs duplicated (rows), runs whose result
was delivered more than once (a finished training discarded and redone), runs with incomplete
spectra or evaluations — all must be 0 — and the sweep's time against the undisturbed one.
Not part of CI (it takes many minutes); figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS, EVERY, LAYERS, SITES, STRATA = 4, 2, 1, 2, 4
MEASURED = len({1, STEPS, *range(EVERY, STEPS + 1, EVERY)})


def make_corpus(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 7))) for _ in range(400)]
    p = 1.0 / np.arange(1, len(words) + 1)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(30):
        (folder / f"d{d:02d}.txt").write_text(" ".join(rng.choice(words, size=300, p=p / p.sum())) + ".\n")
    return folder


def write_spec(path: Path, corpus: Path, store: Path, n: int) -> None:
    path.write_text(f"""name: chaos
store: {store}
data: {{corpus: {corpus}, vocab_size: 300, context: 16, heldout_fraction: 0.2}}
model: {{n_layer: {LAYERS}, d_model: 16, n_head: 2, ffn_mult: 1}}
train: {{steps: {STEPS}, batch_size: 4, device: cpu, eval_tokens: 128}}
measure: {{every: {EVERY}, last_k: 2, tokens: 512, min_stratum_tokens: 8}}
resources: {{cpus: 1, max_retries: 3}}
sweep:
  seed: [{", ".join(str(i) for i in range(n))}]
""")


class Driver:
    """`specdb run` in its own process group, its stderr appended to a log."""

    def __init__(self, spec: Path, address: str, log: Path):
        self.spec, self.address, self.log, self.proc = spec, address, log, None

    def start(self):
        env = {**os.environ, "RAY_ADDRESS": self.address, "SPECDB_SPOOL_WAIT": "120"}
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", "run", str(self.spec), "--address",
                                      self.address, "--max-in-flight", "8"], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "a"), start_new_session=True)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    # a worker running one of our runs is titled "ray::task" (the remote function's name)
    return [int(line.split()[0]) for line in out.splitlines()[1:] if line.split(None, 1)[-1].startswith("ray::task")]


def reader(store: Path, stop: threading.Event, stats: Counter) -> None:
    rng = random.Random(1)
    while not stop.is_set():
        if store.exists():
            try:
                con = duckdb.connect(str(store), read_only=True)
                con.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
                time.sleep(rng.uniform(0, 3))  # a reader that holds the file a while
                con.close()
                stats["reads"] += 1
            except duckdb.Error:
                stats["read_waits"] += 1
        time.sleep(rng.uniform(0, 1))


def sweep(spec: Path, store: Path, address: str, log: Path, chaos: bool, cluster, seed: int) -> tuple[float, Counter]:
    rng = random.Random(seed)
    events: Counter = Counter()
    stop = threading.Event()
    readers = [threading.Thread(target=reader, args=(store, stop, events), daemon=True) for _ in range(2)]
    for t in readers:
        t.start()
    driver = Driver(spec, address, log)
    t0 = time.monotonic()
    driver.start()
    while True:
        time.sleep(rng.uniform(2, 5) if chaos else 0.5)
        if not driver.running():
            if driver.proc.returncode == 0:
                break
            events[f"driver exit {driver.proc.returncode}"] += 1
            driver.start()
            continue
        if not chaos:
            continue
        action = rng.choice(["kill_worker", "kill_worker", "replace_node", "kill_driver"])
        if action == "kill_worker" and (pids := worker_pids()):
            os.kill(rng.choice(pids), signal.SIGKILL)
        elif action == "replace_node" and len(cluster.worker_nodes) > 0:
            cluster.remove_node(rng.choice(list(cluster.worker_nodes)))
            cluster.add_node(num_cpus=1)
        elif action == "kill_driver":
            driver.kill()
            driver.start()
        else:
            continue
        events[action] += 1
    stop.set()
    for t in readers:
        t.join()
    return time.monotonic() - t0, events


def audit(store: Path, spec_runs: int, log: Path) -> dict:
    con = duckdb.connect(str(store), read_only=True)
    try:
        runs = con.execute("SELECT run_id, count(*) FROM runs GROUP BY run_id").fetchall()
        evals = dict(con.execute("SELECT run_id, count(*) FROM evals GROUP BY run_id").fetchall())
        spectra = dict(con.execute("SELECT run_id, count(*) FROM spectra GROUP BY run_id").fetchall())
        status = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    finally:
        con.close()
    delivered = Counter(re.findall(r"\] (?:done|failed|diverged)\s+([0-9a-f]{16}) ", log.read_text()))
    want = MEASURED * LAYERS * SITES * STRATA
    done = [r for r, s in status.items() if s == "done"]
    return {"runs lost": spec_runs - len(runs), "runs duplicated": sum(n > 1 for _, n in runs),
            "runs trained more than once": sum(n > 1 for n in delivered.values()),
            "runs with incomplete spectra": sum(spectra.get(r, 0) != want or evals.get(r, 0) != MEASURED
                                                for r in done),
            "statuses": dict(Counter(status.values()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=2, help="worker nodes beside the head (1 CPU each)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/specdb-chaos"))
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()

    from ray.cluster_utils import Cluster

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work / "corpus")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        results = {}
        for name in (["undisturbed"] if not args.skip_baseline else []) + ["chaos"]:
            store, spec, log = work / f"{name}.duckdb", work / f"{name}.yaml", work / f"{name}.log"
            for p in (store, log):
                p.unlink(missing_ok=True)
            write_spec(spec, corpus, store, args.runs)
            seconds, events = sweep(spec, store, cluster.address, log, name == "chaos", cluster, seed=7)
            results[name] = (seconds, events, audit(store, args.runs, log))
            print(f"{name}: {args.runs} runs in {seconds:.0f} s; events {dict(events)}", flush=True)
            print(f"  {results[name][2]}", flush=True)
        if "undisturbed" in results:
            print(f"chaos / undisturbed time: {results['chaos'][0] / results['undisturbed'][0]:.2f}×")
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
