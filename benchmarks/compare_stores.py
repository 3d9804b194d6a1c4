"""Two sets of runs side by side: β_hard and β_soft per optimizer × stratum, and how far any run
point moved (docs/fidelity.md measures every remaining difference with it).

    python benchmarks/compare_stores.py A.duckdb B.duckdb [--where-a SQL] [--where-b SQL]

Each side is the runs of a store (of any schema from 6 on: a protocol-2 store need not be
migrated), optionally narrowed by a SQL condition on `runs` (a developer's tool on local files:
`--where-a "json_extract(config, '$.measure.all_tokens') = 1024"`). Runs are matched by
optimizer family (`optimizer_name`) and ffn_mult (one seed per width); β is
`spectraldb.fits.power_law` of the site-`post` points against the width, as `specdb query beta`
fits them.
"""

from __future__ import annotations

import argparse

import duckdb

from spectraldb.fits import power_law

STRATA = ("all", "head", "mid", "tail")


def points(path: str, where: str | None) -> dict:
    con = duckdb.connect(path, read_only=True)
    try:
        rows = con.execute(f"""
            SELECT r.optimizer_name, r.ffn_mult, r.ffn_width, p.site, p.stratum, p.metric, p.value
            FROM run_points p JOIN runs r USING (run_id)
            WHERE p.metric IN ('hard', 'soft') AND r.status = 'done' AND ({where or 'true'})""").fetchall()
    finally:
        con.close()
    return {(o, m, site, stratum, metric): (width, value) for o, m, width, site, stratum, metric, value in rows}


def betas(pts: dict) -> dict:
    out = {}
    for opt in sorted({k[0] for k in pts}):
        for stratum in STRATA:
            for metric in ("hard", "soft"):
                xs = sorted((w, v) for (o, _, site, s, m), (w, v) in pts.items()
                            if o == opt and site == "post" and s == stratum and m == metric)
                if len(xs) >= 2:
                    out[(opt, stratum, metric)] = power_law([w for w, _ in xs], [v for _, v in xs]).beta
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--where-a")
    ap.add_argument("--where-b")
    args = ap.parse_args()
    pa, pb = points(args.a, args.where_a), points(args.b, args.where_b)
    ba, bb = betas(pa), betas(pb)
    print("optimizer    stratum  β_hard A → B (Δ)            β_soft A → B (Δ)")
    for opt, stratum in sorted({(o, s) for o, s, _ in ba}):
        cells = []
        for metric in ("hard", "soft"):
            a, b = ba.get((opt, stratum, metric)), bb.get((opt, stratum, metric))
            cells.append("—" if a is None or b is None else f"{a:.4f} → {b:.4f} ({b - a:+.4f})")
        print(f"{opt:<12} {stratum:<8} {cells[0]:<27} {cells[1]}")
    print("\nlargest relative change of a run point (any optimizer, width, site, hard or soft):")
    for stratum in STRATA:
        moved = [(abs(pb[k][1] - v) / abs(v), k) for k, (_, v) in pa.items() if k in pb and k[3] == stratum]
        if moved:
            rel, (opt, mult, site, _, metric) = max(moved)
            print(f"  {stratum:<5} {rel:.2%}  ({opt}, ffn_mult {mult:g}, {site}, {metric})")


if __name__ == "__main__":
    main()
