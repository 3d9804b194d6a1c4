"""End-to-end time of `specdb query beta|matched|delta` on a large synthetic store.

    python benchmarks/queries.py [--runs 10000] [--repeats 3] [--db /tmp/specdb-bench.duckdb]

Builds (once) a store of 10,000 runs × 12 layers × 2 sites × 4 strata × 10 measured steps
(≈ 9.6 M rank rows) directly in SQL: 5 optimizers × 8 widths × n_head {12, 6} × 125 seeds,
with planted power laws, then times each command as a user runs it (a fresh process each
time, process start included) and prints the best and median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from spectraldb import store

OPTIMIZERS = ["AdamW", "Muon", "NorMuon", "Dion (1/2)", "Dion (1/16)"]


def build(db: Path, runs: int) -> None:
    per = runs // (len(OPTIMIZERS) * 8 * 2)
    with store.connect(db) as con:
        con.execute("BEGIN")
        con.execute(f"""
            INSERT INTO runs BY NAME
            SELECT printf('r%06d', i) AS run_id, 'bench' AS spec_name,
                   list_extract(?, 1 + (i % 5)) AS optimizer, lower(split_part(list_extract(?, 1 + (i % 5)), ' ', 1)) AS optimizer_name, 0.003 AS lr,
                   pow(2, (i // 5) % 8) AS ffn_mult, 64 * pow(2, (i // 5) % 8)::INTEGER AS ffn_width,
                   64 AS d_model, 12 AS n_layer, CASE WHEN (i // 40) % 2 = 0 THEN 12 ELSE 6 END AS n_head,
                   512 AS context, 50257 AS vocab_size, 'bench' AS corpus, (i // 80) AS seed, 1000 AS steps,
                   32 AS batch_size, 'heldout' AS measure_source, 5 AS last_k, 'done' AS status,
                   3.0 + (i % 5) * 0.01 AS final_val_loss, 20.0 + (i % 5) * 0.2 AS final_val_ppl, '{{}}' AS config,
                   'rope' AS pos, 'pre' AS norm, 0.0 AS postln_frac, 'relu2' AS activation, 'all' AS keep_eigenvalues
            FROM range({per * 80}) t(i)""", [OPTIMIZERS, OPTIMIZERS])
        con.execute("""
            INSERT INTO ranks BY NAME
            SELECT r.run_id, s.step, l.layer, si.site, st.stratum, 10000 AS n_tokens,
                   v * 1.3 AS soft_rank, v AS hard_rank, ln(v * 1.3) AS spectral_entropy,
                   v * 1.6 AS renyi_0_5, v * 1.3 AS renyi_1, v * 1.1 AS renyi_1_5, v AS renyi_2,
                   v * 0.9 AS renyi_3, v * 0.8 AS renyi_5, v * 0.6 AS renyi_inf, 0.3 AS eee,
                   11 - s.step // 100 AS from_end
            FROM (SELECT run_id, ffn_width,
                         0.5 + 0.1 * (hash(optimizer) % 5) + (CASE WHEN n_head = 6 THEN 0.02 ELSE 0 END) AS b
                  FROM runs) r,
                 range(100, 1001, 100) s(step), range(12) l(layer),
                 (VALUES ('pre'), ('post')) si(site), (VALUES ('all'), ('head'), ('mid'), ('tail')) st(stratum),
                 LATERAL (SELECT 0.5 * pow(r.ffn_width, r.b) * (1 + 0.01 * l.layer) AS v)""")
        con.execute("""INSERT INTO run_points SELECT run_id, site, stratum, metric, median(value), count(*),
                       min(n_tokens) FROM layer_points GROUP BY ALL""")  # what write_run stores per run
        con.execute("""INSERT INTO step_points SELECT run_id, site, stratum, metric, step, median(value), count(*),
                       min(n_tokens) FROM rank_metrics GROUP BY ALL""")
        con.execute("COMMIT")
        n = con.execute("SELECT count(*) FROM ranks").fetchone()[0]
    print(f"built {db}: {runs} runs, {n:,} rank rows", flush=True)


def time_command(args: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True)
        out.append(time.perf_counter() - t)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {p.stderr}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--db", type=Path, default=Path("/tmp/specdb-bench.duckdb"))
    a = ap.parse_args()
    if not a.db.exists():
        t = time.perf_counter()
        build(a.db, a.runs)
        print(f"build took {time.perf_counter() - t:.1f} s")
    base = time_command(["--version"], a.repeats)
    print(f"{'specdb --version (process start)':44s} best {min(base):.2f} s, median {statistics.median(base):.2f} s")
    for args in (["query", "beta", "--stratum", "tail"], ["query", "matched", "--ppl-tol", "0.03"],
                 ["query", "delta", "--arch", "n_head", "--reference", "12"]):
        ts = time_command(args + ["--db", str(a.db), "--format", "json"], a.repeats)
        print(f"{'specdb ' + ' '.join(args):44s} best {min(ts):.2f} s, median {statistics.median(ts):.2f} s")


if __name__ == "__main__":
    main()
