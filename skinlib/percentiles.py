"""Retrieval evaluation of the paper (§4.2, Fig. 4): attribute-difference percentile ranks.

For a test query q, one of its top-k retrieved database images r and an attribute a, the score is
the rank of (v_a(r) − v_a(q))² among the squared differences between q and *all* database
(training) images, as a percentile: lower = the retrieved image is closer to the query in that
attribute than most of the database.

Conventions (fixed here so every method is scored the same way):

* Distance. d(x) = |v_a(x) − v_a(q)| computed in float64. Ranking |Δ| is ranking Δ² (squaring is
  monotone on |Δ| ≥ 0); squaring in floating point would only merge distinct distances.
  Two database images tie when their computed float64 distances are equal.
* Ties: mid-rank. With N_a the number of database images whose value of a is not NaN,

      percentile = 100 · (#{db: d < d_r} + 0.5 · #{db: d == d_r}) / N_a.

  A retrieved database image ties with itself, so its percentile is > 0; a retrieved image with the
  query's exact value (a twin) gets 50 · #{db equal to v_q} / N_a, the lowest score possible.
  A random retrieval scores 50 on average.
* Missing values. Database NaNs are left out of N_a (see `db_counts`). A NaN query or retrieved
  value makes that cell NaN: it stays in the output and `missing_cells` counts it; `summary`
  scores the finite cells only. Infinite values are an error.

The fast path sorts each attribute's database values once and counts by binary search
(`percentile_ranks`); `naive_percentile_ranks` scans the database for every cell and is the
reference the tests and bench/percentile.py compare it with.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import attributes

SUMMARY_COLUMNS = ["method", "attribute", "median_percentile", "mean_percentile", "n_queries"]
LONG_COLUMNS = ["query_id", "rank", "attribute", "percentile", "method"]


def _check_shapes(db_values, query_values, retrieved_values):
    db = np.asarray(db_values, dtype=np.float64)
    qv = np.asarray(query_values, dtype=np.float64)
    rv = np.asarray(retrieved_values, dtype=np.float64)
    if db.ndim != 2:
        raise ValueError(f"db_values must be 2-D (N, A), got shape {db.shape}")
    if qv.ndim != 2:
        raise ValueError(f"query_values must be 2-D (Q, A), got shape {qv.shape}")
    if rv.ndim != 3:
        raise ValueError(f"retrieved_values must be 3-D (Q, k, A), got shape {rv.shape}")
    if qv.shape[1] != db.shape[1] or rv.shape[2] != db.shape[1]:
        raise ValueError(f"attribute counts differ: db {db.shape}, queries {qv.shape}, "
                         f"retrieved {rv.shape} (last axis is the attribute)")
    if rv.shape[0] != qv.shape[0]:
        raise ValueError(f"retrieved_values has {rv.shape[0]} queries, query_values {qv.shape[0]}")
    for what, arr in (("db_values", db), ("query_values", qv), ("retrieved_values", rv)):
        bad = np.isinf(arr)
        if bad.any():
            where = np.argwhere(bad)[0]
            raise ValueError(f"{what} holds {int(bad.sum())} infinite value(s), first at index "
                             f"{tuple(int(i) for i in where)}; use NaN for a missing value")
    empty = [a for a in range(db.shape[1]) if not np.isfinite(db[:, a]).any()]
    if empty:
        raise ValueError(f"attribute column(s) {empty}: no database value that is not NaN")
    return db, qv, rv


def _first_true(u, lo, hi, guess, pred):
    """Per item, the first index i in [lo, hi) where the monotone predicate pred(u[i], item)
    turns true (hi if never), starting from an approximate `guess` and stepping to the exact
    boundary. pred(values, items) -> bool array; items is the integer index of each item."""
    idx = np.clip(guess, lo, hi)
    items = np.arange(len(idx))
    while True:  # step left while the left neighbour is already true
        m = idx > lo
        m[m] = pred(u[idx[m] - 1], items[m])
        if not m.any():
            break
        idx[m] -= 1
    while True:  # step right while the current one is still false
        m = idx < hi
        m[m] = ~pred(u[idx[m]], items[m])
        if not m.any():
            break
        idx[m] += 1
    return idx


def _percentiles_one(sorted_db, q, r):
    """Mid-rank percentiles for 1-D items: query values q, retrieved values r (same length),
    against the sorted finite database values of one attribute."""
    out = np.full(q.shape, np.nan)
    ok = np.isfinite(q) & np.isfinite(r)
    q, r = q[ok], r[ok]
    if q.size == 0:
        return out
    u, counts = np.unique(sorted_db, return_counts=True)
    c = np.concatenate([[0], np.cumsum(counts)])  # c[i] = database values below u[i]
    n = c[-1]
    d = np.abs(r - q)
    m = len(u)
    # Exact in float64: on u >= q the computed distance u - q does not decrease with u, on
    # u < q the distance q - u does not increase; the searchsorted guesses (q ± d) can be off by
    # a few ulps, and _first_true walks them to the exact boundary of the computed distances.
    i0 = np.searchsorted(u, q, side="left")
    zeros = np.zeros_like(i0)
    full = np.full_like(i0, m)
    up_lt = _first_true(u, i0, full, np.searchsorted(u, q + d, side="left"),
                        lambda v, i: (v - q[i]) >= d[i])
    up_le = _first_true(u, i0, full, np.searchsorted(u, q + d, side="right"),
                        lambda v, i: (v - q[i]) > d[i])
    lo_lt = _first_true(u, zeros, i0, np.searchsorted(u, q - d, side="right"),
                        lambda v, i: (q[i] - v) < d[i])
    lo_le = _first_true(u, zeros, i0, np.searchsorted(u, q - d, side="left"),
                        lambda v, i: (q[i] - v) <= d[i])
    less = c[up_lt] - c[lo_lt]
    less_or_equal = c[up_le] - c[lo_le]
    out[ok] = 100.0 * (less + 0.5 * (less_or_equal - less)) / n
    return out


def percentile_ranks(db_values, query_values, retrieved_values) -> np.ndarray:
    """Mid-rank percentile (0-100) of |v(r) − v(q)| among |v(db) − v(q)|, per attribute.

    db_values (N, A), query_values (Q, A), retrieved_values (Q, k, A) -> (Q, k, A) float64.
    Sorts each database column once and binary-searches, so the cost is O((N + Qk) log N) per
    attribute. See the module docstring for ties and NaNs."""
    db, qv, rv = _check_shapes(db_values, query_values, retrieved_values)
    nq, k, na = rv.shape
    out = np.empty(rv.shape)
    for a in range(na):
        col = db[:, a]
        sorted_db = np.sort(col[np.isfinite(col)])
        q = np.repeat(qv[:, a], k)
        out[:, :, a] = _percentiles_one(sorted_db, q, rv[:, :, a].reshape(-1)).reshape(nq, k)
    return out


def naive_percentile_ranks(db_values, query_values, retrieved_values) -> np.ndarray:
    """The same as `percentile_ranks` by scanning the whole database for every query: the
    reference implementation for tests and benchmarks (O(N·Q·k) per attribute)."""
    db, qv, rv = _check_shapes(db_values, query_values, retrieved_values)
    nq, k, na = rv.shape
    out = np.full(rv.shape, np.nan)
    for a in range(na):
        col = db[:, a]
        col = col[~np.isnan(col)]
        for i in range(nq):
            if np.isnan(qv[i, a]):
                continue
            d_db = np.abs(col - qv[i, a])
            d_r = np.abs(rv[i, :, a] - qv[i, a])
            less = (d_db[None, :] < d_r[:, None]).sum(axis=1)
            equal = (d_db[None, :] == d_r[:, None]).sum(axis=1)
            p = 100.0 * (less + 0.5 * equal) / len(col)
            out[i, :, a] = np.where(np.isnan(d_r), np.nan, p)
    return out


def _values(frame: pd.DataFrame, names, where: str) -> np.ndarray:
    if "isic_id" not in frame.columns:
        raise KeyError(f"{where}: no isic_id column")
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise KeyError(f"{where}: lacks attribute column(s) {missing}")
    return frame[list(names)].to_numpy(dtype=np.float64)


def percentile_frame(db: pd.DataFrame, queries: pd.DataFrame, retrieved_ids, names=None,
                     method: str = "") -> pd.DataFrame:
    """Long frame of percentiles: one row per (query, rank, attribute), NaN rows kept.

    db and queries hold `isic_id` and attribute short-name columns; retrieved_ids (Q, k) are db
    isic_ids, row i for queries row i, best first. Columns: query_id, rank (1 = best),
    attribute, percentile, method."""
    names = [a.name for a in attributes.resolve(names)]
    db_vals = _values(db, names, "database frame")
    q_vals = _values(queries, names, "query frame")
    dup = db["isic_id"].duplicated()
    if dup.any():
        raise ValueError(f"database frame: {int(dup.sum())} duplicated isic_id(s), e.g. "
                         f"{db.loc[dup, 'isic_id'].iloc[0]!r}")
    ids = np.asarray(retrieved_ids)
    if ids.ndim != 2 or ids.shape[0] != len(queries):
        raise ValueError(f"retrieved_ids must be (Q, k) with Q = {len(queries)} query rows, "
                         f"got shape {ids.shape}")
    pos = pd.Index(db["isic_id"]).get_indexer(ids.reshape(-1))
    if (pos < 0).any():
        bad = ids.reshape(-1)[pos < 0]
        raise KeyError(f"{len(bad)} retrieved id(s) not in the database frame, e.g. {bad[0]!r}")
    r_vals = db_vals[pos].reshape(ids.shape[0], ids.shape[1], len(names))
    p = percentile_ranks(db_vals, q_vals, r_vals)  # (Q, k, A)
    nq, k, na = p.shape
    # built from integer codes: 9.5 M rows at the paper's size, string by string is slow
    return pd.DataFrame({
        "query_id": queries["isic_id"].reset_index(drop=True)
                    .take(np.repeat(np.arange(nq), k * na)).reset_index(drop=True),
        "rank": np.tile(np.repeat(np.arange(1, k + 1), na), nq),
        "attribute": pd.Categorical.from_codes(np.tile(np.arange(na), nq * k), categories=names),
        "percentile": p.reshape(-1),
        "method": pd.Categorical.from_codes(np.zeros(p.size, dtype=np.int8), categories=[method]),
    }, columns=LONG_COLUMNS)


def _check_long(long: pd.DataFrame, where: str) -> None:
    missing = {"query_id", "attribute", "percentile", "method"} - set(long.columns)
    if missing:
        raise KeyError(f"{where}: long frame lacks column(s) {sorted(missing)}")
    unknown = {str(a) for a in pd.unique(long["attribute"])} - set(attributes.NAMES)
    if unknown:
        raise KeyError(f"{where}: unknown attribute(s) {sorted(unknown)}")


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    order = {n: i for i, n in enumerate(attributes.NAMES)}
    frame = frame.astype({"method": str, "attribute": str})
    frame = frame.assign(_o=frame["attribute"].map(order))
    return frame.sort_values(["method", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def summary(long: pd.DataFrame) -> pd.DataFrame:
    """Per method and attribute (registry order) over the finite cells of a long frame: median and
    mean percentile and n_queries, the queries with at least one scored cell. The layout of
    runs/<profile>/metrics/retrieval.csv; NaN cells are counted by `missing_cells`."""
    _check_long(long, "summary")
    f = long.loc[long["percentile"].notna(), ["method", "attribute", "query_id", "percentile"]]
    g = f.groupby(["method", "attribute"], sort=False, observed=True)
    out = pd.DataFrame({
        "median_percentile": g["percentile"].median(),
        "mean_percentile": g["percentile"].mean(),
        "n_queries": g["query_id"].nunique(),
    }).reset_index()
    return _ordered(out)[SUMMARY_COLUMNS]


def missing_cells(long: pd.DataFrame) -> pd.DataFrame:
    """Per method and attribute: cells (query × rank) in all and those left NaN because the
    query's or the retrieved image's value is missing (columns method, attribute, n_cells, n_nan)."""
    _check_long(long, "missing_cells")
    g = long.groupby(["method", "attribute"], sort=False, observed=True)["percentile"]
    out = pd.DataFrame({"n_cells": g.size(), "n_nan": g.size() - g.count()}).reset_index()
    return _ordered(out)[["method", "attribute", "n_cells", "n_nan"]]


def db_counts(db: pd.DataFrame, names=None) -> pd.DataFrame:
    """Per attribute: database images scored against (n_db = N_a) and those left out as NaN."""
    names = [a.name for a in attributes.resolve(names)]
    vals = _values(db, names, "database frame")
    nan = np.isnan(vals).sum(axis=0)
    return pd.DataFrame({"attribute": names, "n_db": len(vals) - nan, "n_db_nan": nan})
