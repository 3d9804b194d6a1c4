"""Measurement cost side by side: specdb's path vs the previous design vs a naive reference,
its forward/accumulate/decompose/metrics split, and its share of training at ffn_mult 1 and 8.

    python benchmarks/measurement.py [--threads 1] [--tokens 32768] [--scaling] [--device cuda]

The work lives in `workers/bench.py` so that `python -m workers.bench` prints the same on a
machine that has only torch (a fresh GPU box); figures: docs/benchmarks.md.
"""

from workers.bench import main

if __name__ == "__main__":
    main()
