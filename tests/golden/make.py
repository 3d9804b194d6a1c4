"""The golden run: a tiny deterministic sweep whose numbers are pinned in tests/golden/tiny.json.

    python -m tests.golden.make            # compare with the pinned numbers (what the test does)
    python -m tests.golden.make --write    # regenerate tiny.json, deliberately, after a change
                                           # that is meant to move the numbers (say why in the commit)

2 optimizers × 3 widths × 6 steps of a 2-layer d_model-16 GPT on the synthetic corpus of the
tests (no third-party text). Losses, every run's points and β are pinned: a change to a metric,
the aggregation, the fit, the model or an optimizer shows up as a difference here.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PINNED = HERE / "tiny.json"
RTOL = 1e-6  # CPU float differences across machines stay far below this in 6 steps


def compute() -> dict:
    from typer.testing import CliRunner

    from cli.main import app
    from spectraldb.store import connect
    from tests.conftest import TINY_SWEEP, make_corpus, tiny_spec

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp / "corpus")
        spec, db = tmp / "golden.yaml", tmp / "golden.duckdb"
        spec.write_text(tiny_spec(corpus, db, TINY_SWEEP))
        runner = CliRunner()
        result = runner.invoke(app, ["run", str(spec), "--executor", "inline", "--cache-dir", str(tmp / "cache")])
        assert result.exit_code == 0, result.output
        with connect(db, read_only=True) as con:
            runs = con.execute("""SELECT optimizer || ' ×' || ffn_mult, final_val_loss FROM runs ORDER BY 1""").fetchall()
            evals = con.execute("""SELECT r.optimizer || ' ×' || r.ffn_mult, list(e.train_loss ORDER BY e.step)
                                   FROM evals e JOIN runs r USING (run_id) GROUP BY 1 ORDER BY 1""").fetchall()
            points = con.execute("""SELECT r.optimizer || ' ×' || r.ffn_mult || ' ' || p.site || ' ' || p.stratum
                                           || ' ' || p.metric, p.value
                                    FROM run_points p JOIN runs r USING (run_id)
                                    WHERE p.metric IN ('hard', 'soft', 'renyi:3', 'eee') ORDER BY 1""").fetchall()
        betas = {}
        for stratum in ("all", "tail"):
            out = runner.invoke(app, ["query", "beta", "--stratum", stratum, "--db", str(db), "--format", "json"])
            for row in json.loads(out.stdout):
                for m in ("hard", "soft"):
                    betas[f"{row['optimizer']} {stratum} {m}"] = row[f"beta_{m}"]
    return {"final_val_loss": dict(runs), "train_loss": {k: list(v) for k, v in evals},
            "points": dict(points), "beta": betas}


def differences(got: dict, want: dict, rtol: float = RTOL) -> list[str]:
    out = []
    for section, values in want.items():
        for key, w in values.items():
            g = got.get(section, {}).get(key)
            ws, gs = (w if isinstance(w, list) else [w]), (g if isinstance(g, list) else [g])
            if g is None or len(ws) != len(gs) or any(
                    abs(a - b) > rtol * max(1.0, abs(b)) for a, b in zip(gs, ws)):
                out.append(f"{section}[{key}]: got {g}, pinned {w}")
        extra = set(got.get(section, {})) - set(values)
        out += [f"{section}[{k}]: not pinned" for k in sorted(extra)]
    return out


if __name__ == "__main__":
    got = compute()
    if "--write" in sys.argv:
        PINNED.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {PINNED}")
    else:
        diff = differences(got, json.loads(PINNED.read_text()))
        print("\n".join(diff) or "matches the pinned numbers")
        sys.exit(1 if diff else 0)
