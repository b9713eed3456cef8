"""Patient-bootstrap intervals and the paired ordering verdicts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinlib import intervals, metrics


def test_weighted_median_is_the_median_of_the_expanded_values():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 30):
        v = rng.normal(size=n).round(1)          # ties included
        w = rng.integers(0, 4, size=(50, n))
        got = intervals.weighted_median(v, w)
        for row, g in zip(w, got):
            want = np.median(np.repeat(v, row)) if row.sum() else np.nan
            assert g == pytest.approx(want, nan_ok=True)


def test_weighted_r2_is_r2_of_the_expanded_rows():
    rng = np.random.default_rng(1)
    y = rng.normal(size=40)
    p = y + rng.normal(scale=0.5, size=40)
    w = rng.integers(0, 3, size=(20, 40))
    for row, g in zip(w, intervals.weighted_r2(y, p, w)):
        assert g == pytest.approx(metrics.r2_score(np.repeat(y, row), np.repeat(p, row)))


def _long(values: dict[str, np.ndarray], queries, patients) -> pd.DataFrame:
    """A percentile frame: one cell per query per method, attribute areaMM2."""
    rows = [pd.DataFrame({"query_id": queries, "rank": 1, "attribute": "areaMM2", "percentile": v, "method": m})
            for m, v in values.items()]
    return pd.concat(rows, ignore_index=True)


def test_resampling_is_by_patient_not_by_row():
    # 8 patients, 50 lesions each, all lesions of a patient alike: the data hold 8 values, not 400
    rng = np.random.default_rng(2)
    patients = np.repeat([f"P{i}" for i in range(8)], 50)
    queries = [f"q{i}" for i in range(400)]
    level = np.repeat(rng.uniform(0, 100, 8), 50)
    long = _long({"image": level}, queries, patients)
    by_patient = intervals.median_intervals(long, dict(zip(queries, patients)), n_boot=400)
    by_row = intervals.median_intervals(long, dict(zip(queries, queries)), n_boot=400)
    width = lambda t: float(t.hi.iloc[0] - t.lo.iloc[0])
    assert width(by_patient) > 3 * width(by_row)


def test_ordering_verdicts_hold_reverse_or_stay_unseparated():
    rng = np.random.default_rng(3)
    n = 300
    queries = [f"q{i}" for i in range(n)]
    patients = dict(zip(queries, [f"P{i // 3}" for i in range(n)]))
    base = rng.uniform(0, 100, n)
    long = _long({"image_text": base * 0.5, "image": base, "image_untuned": base + rng.normal(0, 1, n),
                  "baseline_encoder": base * 1.5, "hierarchical": base * 0.5 + 0.5}, queries, patients)
    table = intervals.ordering(long, patients, n_boot=300)
    assert list(table.columns) == intervals.ORDERING_COLUMNS
    got = dict(zip(table.comparison, table.verdict))
    assert got["image_text<image"] == "holds"
    assert got["image<baseline_encoder"] == "holds"
    assert got["image<image_untuned"] == "not separable"
    assert got["hierarchical~image_text"] == "holds"
    for _, r in table.iterrows():
        assert r.lo <= r.difference <= r.hi
    # swap the roles: the same evidence now reverses the comparison
    swapped = long.replace({"method": {"image_text": "image", "image": "image_text"}})
    t2 = intervals.ordering(swapped, patients, n_boot=300)
    assert dict(zip(t2.comparison, t2.verdict))["image_text<image"] == "reversed"
    sentence = intervals.ordering_sentence(table)
    assert "image+text retrieves closer values than image-only on 1 of 1" in sentence
    assert "not separable from noise on areaMM2" in sentence


def test_within_verdict_uses_the_margin_both_ways():
    assert intervals.verdict("within", -1.5, 1.9) == "holds"
    assert intervals.verdict("within", -1.0, 3.0) == "not separable"
    assert intervals.verdict("within", 2.5, 4.0) == "reversed"
    assert intervals.verdict("less", -3, -1) == "holds"
    assert intervals.verdict("less", 1, 3) == "reversed"
    assert intervals.verdict("less", -1, 1) == "not separable"
    with pytest.raises(ValueError, match="kind"):
        intervals.verdict("more", 0, 1)


def test_r2_intervals_cover_the_point_and_name_missing_patients():
    rng = np.random.default_rng(4)
    ids = [f"i{k}" for k in range(200)]
    y = rng.normal(size=200)
    pred = pd.DataFrame({"isic_id": ids, "attribute": "areaMM2", "true": y, "pred": y + rng.normal(0, .5, 200)})
    pred.loc[3, "pred"] = np.nan   # an unparsed reply: left out, as r2_table leaves it out
    patients = {i: f"P{k // 4}" for k, i in enumerate(ids)}
    t = intervals.r2_intervals(pred, patients, n_boot=300)
    r = t.iloc[0]
    assert r.r2 == pytest.approx(metrics.r2_table(pred).set_index("attribute").r2["areaMM2"])
    assert r.r2_lo < r.r2 < r.r2_hi
    again = intervals.r2_intervals(pred, patients, n_boot=300)
    pd.testing.assert_frame_equal(t, again)   # seeded
    with pytest.raises(KeyError, match="no patient"):
        intervals.r2_intervals(pred, {i: "P" for i in ids[:-1]}, n_boot=10)


def test_blocks_give_the_same_draws(monkeypatch):
    rng = np.random.default_rng(5)
    queries = [f"q{i}" for i in range(60)]
    patients = {q: f"P{i // 2}" for i, q in enumerate(queries)}
    long = _long({"image": rng.uniform(0, 100, 60)}, queries, patients)
    whole = intervals.median_intervals(long, patients, n_boot=100)
    monkeypatch.setattr(intervals, "BLOCK", 7 * 60)   # 7 resamples at a time
    pd.testing.assert_frame_equal(whole, intervals.median_intervals(long, patients, n_boot=100))


def test_summary_gains_the_interval_of_each_median():
    from skinlib import percentiles
    rng = np.random.default_rng(6)
    queries = [f"q{i}" for i in range(90)]
    patients = {q: f"P{i // 3}" for i, q in enumerate(queries)}
    long = _long({"image": rng.uniform(0, 100, 90), "image_text": rng.uniform(0, 60, 90)}, queries, patients)
    s = intervals.summary_with_intervals(percentiles.summary(long), long, patients, n_boot=200)
    assert list(s.columns[:5]) == percentiles.SUMMARY_COLUMNS and len(s) == 2
    assert (s.median_lo <= s.median_percentile).all() and (s.median_percentile <= s.median_hi).all()


def test_seed_agreement_sentence_names_the_attributes_whose_verdicts_differ():
    wide = pd.DataFrame({"attribute": ["areaMM2", "B"], "comparison": ["image_text<image"] * 2,
                         "verdict_seed0": ["holds", "holds"], "verdict_seed1": ["holds", "not separable"],
                         "agree": [True, False]})
    text = intervals.seed_agreement_sentence(wide)
    assert text.startswith("Across training seeds (seed0, seed1): ")
    assert "agree on 1 of 2 attributes (not on B: holds vs not separable)" in text
