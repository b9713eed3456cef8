"""Percentile-rank evaluation (paper §4.2): sorted database + binary search vs a naive scan.

    .venv/bin/python bench/percentile.py [--quick]

Synthetic attribute values at the paper's sizes (282,564 database images, 118,495 queries × 5
retrieved, 16 attributes), rounded to 2 decimals so that ties are common, 2 % NaN. Ours runs on
every query; the naive scan runs on the first --naive-queries queries and its time is scaled
linearly to all of them (its cost is exactly linear in the query count). The two agree exactly
on the common queries (checked before the row is written).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from common import append, best_of, row, show
from skinlib import percentiles


def data(n_db: int, n_q: int, k: int, n_att: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 20, n_att)
    db = np.round(rng.lognormal(0, 0.7, (n_db, n_att)) * scale, 2)
    qv = np.round(rng.lognormal(0, 0.7, (n_q, n_att)) * scale, 2)
    rv = db[rng.integers(0, n_db, (n_q, k))]
    for arr in (db, qv):
        arr[rng.random(arr.shape) < 0.02] = np.nan
    return db, qv, rv


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script works")
    p.add_argument("--naive-queries", type=int, default=None,
                   help="queries the naive scan is timed on (default 200; 50 with --quick)")
    a = p.parse_args(argv)
    n_db, n_q, k, n_att = (20_000, 5_000, 5, 16) if a.quick else (282_564, 118_495, 5, 16)
    n_naive = a.naive_queries or (50 if a.quick else 200)

    db, qv, rv = data(n_db, n_q, k, n_att)
    ours_s, fast = best_of(lambda: percentiles.percentile_ranks(db, qv, rv))
    naive_s, naive = best_of(lambda: percentiles.naive_percentile_ranks(db, qv[:n_naive], rv[:n_naive]))
    if not np.array_equal(fast[:n_naive], naive, equal_nan=True):
        print("MISMATCH between fast and naive percentiles", file=sys.stderr)
        return 1
    baseline_s = naive_s * n_q / n_naive
    rows = [row("percentile ranks: sorted+searchsorted vs naive scan",
                f"db={n_db} q={n_q}x{k} a={n_att} (naive extrapolated from {n_naive} queries: "
                f"{naive_s:.3g} s)", baseline_s, ours_s)]
    append(rows)
    show(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
