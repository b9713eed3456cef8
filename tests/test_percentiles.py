import numpy as np
import pandas as pd
import pytest

from skinlib import attributes, percentiles


def _brute(db, qv, rv):
    """An independent reference: ranks written as a double loop over the database, no numpy
    broadcasting, straight from the definition in the module docstring."""
    nq, k, na = rv.shape
    out = np.full(rv.shape, np.nan)
    for a in range(na):
        col = [float(x) for x in db[:, a] if not np.isnan(x)]
        for i in range(nq):
            for j in range(k):
                q, r = float(qv[i, a]), float(rv[i, j, a])
                if np.isnan(q) or np.isnan(r):
                    continue
                dr = abs(r - q)
                less = sum(1 for x in col if abs(x - q) < dr)
                equal = sum(1 for x in col if abs(x - q) == dr)
                out[i, j, a] = 100.0 * (less + 0.5 * equal) / len(col)
    return out


def _tied_data(rng, n=300, nq=40, k=5, na=4, nan_rate=0.05):
    """Small integer ranges (many ties, mirror-image distances), one float column with
    decimals, NaNs everywhere, and retrieved values drawn from the database."""
    db = rng.integers(-6, 7, size=(n, na)).astype(float)
    db[:, -1] = np.round(rng.normal(0, 1, n), 1)  # decimals: float rounding of |v - q|
    qv = rng.integers(-6, 7, size=(nq, na)).astype(float)
    qv[:, -1] = np.round(rng.normal(0, 1, nq), 1)
    rv = db[rng.integers(0, n, size=(nq, k))]  # (nq, k, na)
    rv[0, 0] = qv[0]  # a twin
    for arr in (db, qv, rv):
        arr[rng.random(arr.shape) < nan_rate] = np.nan
    return db, qv, rv


def test_fast_equals_naive_equals_brute_with_ties_and_nans():
    rng = np.random.default_rng(0)
    db, qv, rv = _tied_data(rng)
    fast = percentiles.percentile_ranks(db, qv, rv)
    naive = percentiles.naive_percentile_ranks(db, qv, rv)
    brute = _brute(db, qv, rv)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(brute))
    np.testing.assert_array_equal(fast, naive)
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-12)
    # NaN cells are exactly those with a NaN query or retrieved value
    expected_nan = np.isnan(rv) | np.isnan(qv)[:, None, :]
    np.testing.assert_array_equal(np.isnan(fast), expected_nan)
    assert expected_nan.any() and np.isnan(db).any()


@pytest.mark.parametrize("seed", range(5))
def test_fast_equals_naive_on_awkward_floats(seed):
    # values whose differences round: decimals, large offsets, tiny steps, repeated values
    rng = np.random.default_rng(seed)
    base = rng.choice([0.0, 1e6, -3.3, 0.1], size=1)[0]
    steps = rng.choice([0.1, 0.01, 1e-9, 0.3, 7.0], size=1)[0]
    db = base + steps * rng.integers(-20, 21, size=(500, 2))
    db = np.repeat(db, rng.integers(1, 4, size=500), axis=0)  # repeated values
    qv = base + steps * rng.integers(-25, 26, size=(60, 2)) + rng.choice([0, steps / 2], (60, 2))
    rv = db[rng.integers(0, len(db), size=(60, 5))]
    np.testing.assert_array_equal(percentiles.percentile_ranks(db, qv, rv),
                                  percentiles.naive_percentile_ranks(db, qv, rv))


def test_twin_gets_the_minimum_and_a_self_match_is_positive():
    rng = np.random.default_rng(2)
    db = rng.integers(0, 10, size=(200, 3)).astype(float)
    qv = db[:10] + 0.0  # queries that are database rows
    rv = np.stack([db[:10], db[10:20]], axis=1)  # rank 1 = the query's twin
    p = percentiles.percentile_ranks(db, qv, rv)
    # the lowest percentile any database item can get for that query
    all_db = percentiles.naive_percentile_ranks(db, qv, np.repeat(db[None], 10, axis=0))
    np.testing.assert_array_equal(p[:, 0, :], all_db.min(axis=1))
    assert (p[:, 0, :] > 0).all()
    assert (p[:, 0, :] <= p[:, 1, :]).all()


def test_random_retrieval_scores_about_fifty():
    rng = np.random.default_rng(3)
    db = rng.normal(size=(5000, 2))
    qv = rng.normal(size=(400, 2))
    rv = db[rng.integers(0, 5000, size=(400, 5))]
    assert abs(np.nanmean(percentiles.percentile_ranks(db, qv, rv)) - 50) < 3


def test_shape_errors_are_clear():
    db, qv, rv = np.zeros((10, 3)), np.zeros((4, 3)), np.zeros((4, 5, 3))
    with pytest.raises(ValueError, match="db_values must be 2-D"):
        percentiles.percentile_ranks(db[:, 0], qv, rv)
    with pytest.raises(ValueError, match="retrieved_values must be 3-D"):
        percentiles.percentile_ranks(db, qv, rv[:, 0])
    with pytest.raises(ValueError, match="attribute counts differ"):
        percentiles.percentile_ranks(db, qv[:, :2], rv)
    with pytest.raises(ValueError, match="3 queries, query_values 4"):
        percentiles.percentile_ranks(db, qv, rv[:3])
    bad = db.copy()
    bad[:, 1] = np.nan
    with pytest.raises(ValueError, match=r"column\(s\) \[1\]"):
        percentiles.percentile_ranks(bad, qv, rv)
    bad = db.copy()
    bad[7, 2] = np.inf
    with pytest.raises(ValueError, match=r"infinite.*\(7, 2\)"):
        percentiles.percentile_ranks(bad, qv, rv)


def _frames(rng, n=120, nq=15):
    names = list(attributes.NAMES[:3])
    db = pd.DataFrame(rng.integers(0, 8, size=(n, 3)).astype(float), columns=names)
    db.insert(0, "isic_id", [f"ISIC_{i:07d}" for i in range(n)])
    db.loc[5, names[1]] = np.nan
    q = pd.DataFrame(rng.integers(0, 8, size=(nq, 3)).astype(float), columns=names)
    q.insert(0, "isic_id", [f"ISIC_9{i:06d}" for i in range(nq)])
    q.loc[2, names[0]] = np.nan
    ids = db["isic_id"].to_numpy()[rng.integers(6, n, size=(nq, 5))]  # not row 5 ...
    ids[3, 1] = db.isic_id[5]  # ... but once: a retrieved image with a missing value
    return names, db, q, ids


def test_percentile_frame_matches_arrays_and_counts_nans():
    rng = np.random.default_rng(4)
    names, db, q, ids = _frames(rng)
    long = percentiles.percentile_frame(db, q, ids, names=names, method="image-only")
    assert list(long.columns) == percentiles.LONG_COLUMNS
    assert len(long) == 15 * 5 * 3  # nothing dropped
    pos = {v: i for i, v in enumerate(db.isic_id)}
    rv = db[names].to_numpy()[[[pos[x] for x in row] for row in ids]]
    ref = percentiles.naive_percentile_ranks(db[names].to_numpy(), q[names].to_numpy(), rv)
    got = long.pivot_table(index=["query_id", "rank"], columns="attribute", values="percentile",
                           dropna=False, observed=True)
    np.testing.assert_array_equal(
        got.loc[[(qid, r) for qid in q.isic_id for r in range(1, 6)], names].to_numpy(),
        ref.reshape(-1, 3))

    miss = percentiles.missing_cells(long)
    assert list(miss.attribute) == names and (miss.n_cells == 75).all()
    assert miss.set_index("attribute").n_nan.to_dict() == {names[0]: 5, names[1]: 1, names[2]: 0}
    counts = percentiles.db_counts(db, names).set_index("attribute")
    assert counts.n_db[names[1]] == 119 and counts.n_db_nan[names[1]] == 1


def test_summary_layout_and_values():
    rng = np.random.default_rng(5)
    names, db, q, ids = _frames(rng)
    long = pd.concat([percentiles.percentile_frame(db, q, ids, names=names, method="b"),
                      percentiles.percentile_frame(db, q, ids[:, ::-1], names=names, method="a")])
    s = percentiles.summary(long)
    assert list(s.columns) == percentiles.SUMMARY_COLUMNS
    assert list(s.method) == ["a"] * 3 + ["b"] * 3
    assert list(s.attribute) == names * 2  # registry order within a method
    for _, row in s.iterrows():
        cell = long[(long.method == row.method) & (long.attribute == row.attribute)]
        finite = cell.percentile.dropna()
        assert row.median_percentile == pytest.approx(np.median(finite))
        assert row.mean_percentile == pytest.approx(np.mean(finite))
        assert row.n_queries == cell.loc[cell.percentile.notna(), "query_id"].nunique()
    assert s.set_index(["method", "attribute"]).n_queries[("a", names[0])] == 14  # query 2 NaN


def test_frame_errors_name_the_problem():
    rng = np.random.default_rng(6)
    names, db, q, ids = _frames(rng)
    with pytest.raises(KeyError, match="nope"):
        percentiles.percentile_frame(db, q, ids, names=["nope"])
    with pytest.raises(KeyError, match=r"database frame: lacks attribute column\(s\) \['A'\]"):
        percentiles.percentile_frame(db, q, ids, names=names + ["A"])
    bad = ids.copy()
    bad[1, 1] = "ISIC_missing"
    with pytest.raises(KeyError, match="ISIC_missing"):
        percentiles.percentile_frame(db, q, bad, names=names)
    with pytest.raises(ValueError, match=r"\(Q, k\) with Q = 15"):
        percentiles.percentile_frame(db, q, ids[:4], names=names)
    dup = pd.concat([db, db.iloc[[3]]])
    with pytest.raises(ValueError, match="ISIC_0000003"):
        percentiles.percentile_frame(dup, q, ids, names=names)
    with pytest.raises(KeyError, match="unknown attribute"):
        percentiles.summary(pd.DataFrame({"query_id": ["x"], "attribute": ["zz"],
                                       "percentile": [1.0], "method": ["m"]}))


def test_percentile_frame_ignores_the_frames_index():
    rng = np.random.default_rng(7)
    names, db, q, ids = _frames(rng)
    plain = percentiles.percentile_frame(db, q, ids, names=names, method="m")
    odd = percentiles.percentile_frame(db.set_index(db.index[::-1]), q.set_index(q.index * 3 + 7),
                                    ids, names=names, method="m")
    pd.testing.assert_frame_equal(plain, odd)
    assert list(plain.query_id[:15]) == [q.isic_id[0]] * 15
    assert list(plain["rank"][:4]) == [1, 1, 1, 2] and list(plain.attribute[:4]) == names + [names[0]]
