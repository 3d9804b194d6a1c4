"""Load on `specdb serve`: concurrent clients while a writer commits runs.

    python benchmarks/serve.py [--runs 1000] [--clients 32] [--seconds 30] [--db /tmp/specdb-serve.duckdb]
                               [--warm-db specdb.duckdb] [--no-cache] [--heavy 8]

Builds (once) a synthetic store of `--runs` runs (benchmarks/queries.py's builder), starts a real
`specdb serve` on a free loopback port, and for `--seconds` runs `--clients` client threads that
request a mix of endpoints while another process commits one new run per second through
`store.write_run` (as a driver would). Prints per endpoint: requests, requests/s, p50 and p99
latency, errors; how answers were served (hit, stale while a refresh computed, shared, computed)
and the oldest stale one; and the writer's commits and its slowest commit. With `--warm-db`,
first times warm `/api/beta` alone (sequential requests, no writer) on that store. With
`--no-cache` every request demands the current answer (the worst case for latency). With
`--heavy N`, N of the clients send only the attacks of issue 21 (a 2 GB SQL answer, a slow SQL
encoding, predicates that allocate gigabytes or run for minutes); the report adds their answers
by status code, /api/status's own p99, and the server's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import random
import runpy
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEAVY = [("POST", "/api/sql", {"query": "SELECT repeat('x', 200000) AS s FROM range(10000)"}),
         ("POST", "/api/sql", {"query": "SELECT range(0, 3000) AS r FROM range(10000)"}),
         ("GET", "/api/beta?where=" + urllib.parse.quote("length(repeat(run_id, 100000000)) > 0"), None),
         ("GET", "/api/dynamics?where=" + urllib.parse.quote("list_reduce(range(0, 30000000), lambda a, b: a + b) > 0"),
          None)]
ENDPOINTS = ["/api/beta", "/api/beta?stratum=tail&by=optimizer,n_head", "/api/matched", "/api/runs?limit=50",
             "/api/status", "/api/dynamics?stratum=all"]

WRITER = """
import sys, time, numpy as np
from spectraldb import store
from contract.records import RunResult
from spectraldb.spec import RunSpec
db, seconds = sys.argv[1], float(sys.argv[2])
t_end, i, worst, n = time.time() + seconds, 0, 0.0, 0
while time.time() < t_end:
    t0 = time.time()
    run = RunSpec.model_validate({"model": {"d_model": 32, "ffn_mult": 1 + i % 8}, "train": {"steps": 300, "seed": 10_000 + i}})
    D = run.model.ffn_width
    spectra = [{"step": s, "layer": l, "site": site, "stratum": "all", "n_tokens": 50 * D, "n_dim": D,
                "eigenvalues": np.linspace(1.0, 0.01, D), "min_eigenvalue": 0.0}
               for s in (100, 200, 300) for l in (0, 1) for site in ("pre", "post")]
    store.write_run(db, run, RunResult.from_dict({"status": "done", "started_at": 0.0, "finished_at": 1.0,
                                                  "spectra": spectra, "evals": [{"step": 300, "train_loss": 3.0,
                                                                                 "val_loss": 3.0, "val_ppl": 20.0}]}), {})
    worst, n, i = max(worst, time.time() - t0), n + 1, i + 1
    time.sleep(max(0.0, 1.0 - (time.time() - t0)))
print(n, worst)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(db: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--db", str(db), "--port", str(port)],
                            cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/api/status", timeout=5).read()
            return proc, base
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise SystemExit("the server did not start")


FAILURES: list[str] = []


HEADERS: dict[str, str] = {}
SEEN: list[tuple[str, int]] = []  # (x-specdb-cache, age) of every answer


def fetch(url: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=HEADERS), timeout=60) as r:
            json.loads(r.read())
            code = r.status
            SEEN.append((r.headers.get("x-specdb-cache") or "computed", int(r.headers.get("age") or 0)))
    except urllib.error.HTTPError as e:
        code = e.code
        FAILURES.append(f"{url}: {e.code} {e.read()[:300]!r}")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        code = 0
        FAILURES.append(f"{url}: {type(e).__name__}: {e}")
    return code, time.perf_counter() - t0


def attack(base: str, method: str, path: str, payload) -> tuple[int, float]:
    """One heavy request, its answer read and dropped (the service must bound it, not the client)."""
    t0 = time.perf_counter()
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **HEADERS})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        e.read()
        code = e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        code = 0
    return code, time.perf_counter() - t0


def peak_rss_mib(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    return int(text.split("VmHWM:")[1].split()[0]) / 1024


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--db", type=Path, default=Path("/tmp/specdb-serve.duckdb"))
    ap.add_argument("--warm-db", type=Path, default=None)
    ap.add_argument("--no-cache", action="store_true", help="send Cache-Control: no-cache (never a stale answer)")
    ap.add_argument("--heavy", type=int, default=0, help="clients that send only heavy attack requests")
    args = ap.parse_args()
    if args.no_cache:
        HEADERS["Cache-Control"] = "no-cache"

    if args.warm_db:
        proc, base = serve(args.warm_db)
        try:
            times = [fetch(base + "/api/beta")[1] for _ in range(60)][10:]
            print(f"warm /api/beta on {args.warm_db}: p50 {pct(times, 0.5):.1f} ms, p99 {pct(times, 0.99):.1f} ms "
                  f"({len(times)} sequential requests)", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)

    if not args.db.exists():
        runpy.run_path(str(HERE / "queries.py"))["build"](args.db, args.runs)
    proc, base = serve(args.db)
    stats: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    stop = time.monotonic() + args.seconds
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(args.db), str(args.seconds)], cwd=HERE.parent,
                              stdout=subprocess.PIPE, text=True)
    lock = threading.Lock()

    heavy_codes: dict[int, int] = defaultdict(int)
    heavy_times: list[float] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            path = rng.choice(ENDPOINTS)
            code, seconds = fetch(base + path)
            with lock:
                stats[path].append(seconds)
                if code != 200:
                    errors[path] += 1

    def attacker(seed: int) -> None:
        i = seed
        while time.monotonic() < stop:
            code, seconds = attack(base, *HEAVY[i % len(HEAVY)])
            i += 1
            with lock:
                heavy_codes[code] += 1
                heavy_times.append(seconds)

    threads = [threading.Thread(target=attacker if i < args.heavy else client, args=(i,)) for i in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    commits, worst = writer.communicate(timeout=300)[0].split()
    alive = proc.poll() is None and fetch(base + "/api/status")[0] == 200
    peak = peak_rss_mib(proc.pid)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    print(f"{args.clients} clients for {wall:.0f} s on {args.db} while a writer committed {commits} runs "
          f"(slowest commit {float(worst):.2f} s)")
    print(f"{'endpoint':48s} {'requests':>8s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s}")
    for path in ENDPOINTS:
        xs = stats[path]
        print(f"{path:48s} {len(xs):8d} {len(xs) / wall:7.1f} {pct(xs, 0.5):8.1f} {pct(xs, 0.99):8.1f} {errors[path]:6d}")
    total = sum(len(x) for x in stats.values())
    print(f"{'all':48s} {total:8d} {total / wall:7.1f} {pct([y for x in stats.values() for y in x], 0.5):8.1f} "
          f"{pct([y for x in stats.values() for y in x], 0.99):8.1f} {sum(errors.values()):6d}")
    print(f"median over endpoints of p50: {statistics.median(pct(x, 0.5) for x in stats.values()):.1f} ms")
    kinds = {k: sum(1 for kind, _ in SEEN if kind == k) for k in sorted({kind for kind, _ in SEEN})}
    print("answers: " + ", ".join(f"{k} {v}" for k, v in kinds.items()) +
          f"; oldest stale answer {max((age for kind, age in SEEN if kind == 'stale'), default=0)} s")
    if args.heavy:
        print(f"{args.heavy} heavy clients: {len(heavy_times)} attacks, answers by code "
              f"{dict(sorted(heavy_codes.items()))}, p50 {pct(heavy_times, 0.5):.0f} ms, p99 {pct(heavy_times, 0.99):.0f} ms")
        print(f"/api/status p99 {pct(stats['/api/status'], 0.99):.1f} ms; server alive after: {alive}; "
              f"server peak resident memory {peak:.0f} MiB")
    for line in FAILURES[:5]:
        print("error:", line)


if __name__ == "__main__":
    main()
