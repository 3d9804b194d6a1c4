"""β for TAIL tokens as an Arrow table, from a store (the notebook API; README, "In a notebook").

    python examples/notebook.py specdb.duckdb
"""

import sys

import spectraldb

db = spectraldb.open(sys.argv[1] if len(sys.argv) > 1 else "specdb.duckdb")
tail = db.beta(strata="tail")                    # the same answer as `specdb query beta --stratum tail`
table = tail.to_arrow()                          # a pyarrow Table: optimizer, beta_hard, beta_soft, …
print(table.select(["optimizer", "beta_hard", "beta_soft", "n_widths"]))
for group in tail.groups:                        # the fits behind the rows, intercepts included
    fit = group.fits["hard"]
    if fit is not None:
        print(f"{group.key['optimizer']}: ln(hard rank) ≈ {fit.intercept:.3f} + {fit.beta:.3f}·ln D, R² {fit.r2:.3f}")
