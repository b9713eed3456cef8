import numpy as np
import pandas as pd
import pytest

from skinlib import attributes, metrics


def test_r2_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    y = rng.normal(5, 2, 300)
    p = y + rng.normal(0, 1, 300)
    # independent: R² of a prediction = 1 - MSE / Var(y) (population variance)
    assert metrics.r2_score(y, p) == pytest.approx(1 - np.mean((y - p) ** 2) / np.var(y))
    assert metrics.r2_score(y, y) == 1.0
    assert metrics.r2_score(y, np.full_like(y, y.mean())) == pytest.approx(0.0)
    assert metrics.r2_score(y, -y) < 0


def test_r2_table_counts_unparsed_and_keeps_registry_order():
    rng = np.random.default_rng(1)
    rows = []
    for name in ("deltaL", "areaMM2"):
        y = rng.normal(0, 1, 50)
        p = y + rng.normal(0, 0.3, 50)
        p[:4] = np.nan
        rows.append(pd.DataFrame({"attribute": name, "true": y, "pred": p}))
    t = metrics.r2_table(pd.concat(rows))
    assert list(t.columns) == ["attribute", "r2", "mae", "n", "unparsed"]
    assert list(t.attribute) == ["areaMM2", "deltaL"]                 # registry order
    assert (t.n == 46).all() and (t.unparsed == 4).all()
    assert (t.r2 > 0.8).all()


def test_r2_table_refuses_unknown_attributes():
    with pytest.raises(KeyError, match="nope"):
        metrics.r2_table(pd.DataFrame({"attribute": ["nope"], "true": [1.0], "pred": [1.0]}))


def _ridge_by_lstsq(xtr, ytr, xte, lam):
    # the same ridge written as an augmented least-squares problem, intercept as a column
    mu, sd = xtr.mean(0), xtr.std(0)
    a, b = (xtr - mu) / sd, (xte - mu) / sd
    n, d = a.shape
    aug = np.vstack([np.c_[a, np.ones(n)], np.c_[np.sqrt(lam * n) * np.eye(d), np.zeros(d)]])
    w = np.linalg.lstsq(aug, np.r_[ytr, np.zeros(d)], rcond=None)[0]
    return np.c_[b, np.ones(len(b))] @ w


def test_ridge_readout_matches_least_squares_and_counts_unmeasured_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) * rng.uniform(0.5, 5, 6)
    y = x @ rng.normal(size=6) + rng.normal(0, 0.5, 400)
    y[[3, 50, 301, 350]] = np.nan      # not measured: out of the fit (two) and the score (two)
    tr, te = slice(0, 300), slice(300, 400)
    r2, ntr, nte = metrics.ridge_readout_r2(x[tr], y[tr], x[te], y[te], lam=0.05)
    ok, okt = np.isfinite(y[tr]), np.isfinite(y[te])
    p = _ridge_by_lstsq(x[tr][ok], y[tr][ok], x[te][okt], 0.05)
    assert (ntr, nte) == (298, 98)
    assert r2 == pytest.approx(metrics.r2_score(y[te][okt], p), abs=1e-10)
    assert r2 > 0.9   # a linear attribute is read out linearly
    with pytest.raises(ValueError, match="vectors must be"):
        metrics.ridge_readout_r2(x[tr], y[tr], x[te, :5], y[te])


def test_readout_table_reads_each_attribute_from_its_own_question_vector():
    names = ["areaMM2", "B", "norm_border"]
    rng = np.random.default_rng(1)

    def make(n):
        vals = pd.DataFrame(rng.normal(size=(n, 16)), columns=metrics.attributes.NAMES)
        per_q = rng.normal(size=(n, 16, 4))
        per_q[:, :, 0] += 3 * vals.to_numpy()      # vector j holds attribute j, the others noise
        return vals, {"image_text": per_q, "image": rng.normal(size=(n, 4))}

    dv, dx = make(300)
    qv, qx = make(100)
    t = metrics.readout_table(dx, dv, qx, qv, names=names)
    assert list(t.columns) == ["attribute", "kind", "r2", "n_train", "n_test"]
    own = t[t.kind == "image_text"].set_index("attribute").r2
    assert list(own.index) == names and (own > 0.8).all()          # the attribute's own vector
    assert (t[t.kind == "image"].r2 < 0.1).all()                    # noise reads out nothing
    with pytest.raises(KeyError, match="kinds"):
        metrics.readout_table(dx, dv, {"image": qx["image"]}, qv, names=names)
    with pytest.raises(ValueError, match="'image' has 300 / 99 vectors"):
        metrics.readout_table({"image": dx["image"]}, dv, {"image": qx["image"][:99]}, qv, names=names)
    # fitted on chosen database rows only: the same as a read-out of those rows alone
    rows = {n: rng.random(300) < 0.4 for n in names}
    part = metrics.readout_table(dx, dv, qx, qv, names=names, fit_rows=rows)
    for r in part.itertuples():
        x = dx[r.kind][:, metrics.attributes.NAMES.index(r.attribute)] if r.kind == "image_text" else dx[r.kind]
        xq = qx[r.kind][:, metrics.attributes.NAMES.index(r.attribute)] if r.kind == "image_text" else qx[r.kind]
        m = rows[r.attribute]
        want = metrics.ridge_readout_r2(x[m], dv[r.attribute][m], xq, qv[r.attribute])
        assert (r.r2, r.n_train, r.n_test) == pytest.approx(want) and r.n_train == m.sum()
    assert (part.set_index(["attribute", "kind"]).r2 != t.set_index(["attribute", "kind"]).r2).all()
    with pytest.raises(KeyError, match="lacks \\['norm_border'\\]"):
        metrics.readout_table(dx, dv, qx, qv, names=names, fit_rows={n: rows[n] for n in names[:2]})
    with pytest.raises(ValueError, match="boolean arrays of 300"):
        metrics.readout_table(dx, dv, qx, qv, names=names, fit_rows={**rows, "B": rows["B"][:10]})


def test_r2_parts_add_up_to_r2_and_name_the_loss():
    rng = np.random.default_rng(1)
    y = rng.gamma(2.0, 2.0, 400)                       # skewed, like area_perim_ratio
    noisy = y + rng.normal(0, 1.5, 400)
    for p, cause in [(noisy, None), (0.4 * (noisy - noisy.mean()) + y.mean(), "scale"),
                     (noisy - 3.0, "offset"), (np.full_like(y, np.median(y)), "offset")]:
        parts = metrics.r2_parts(y, p)
        # the three parts rebuild R² computed independently
        assert parts["tracked"] - parts["scale"] - parts["offset"] == pytest.approx(metrics.r2_score(y, p))
        assert parts["r2"] == pytest.approx(metrics.r2_score(y, p))
        if np.std(p) > 0:
            assert parts["tracked"] == pytest.approx(np.corrcoef(y, p)[0, 1] ** 2)
        if cause:   # the part that was spoilt is the largest loss
            assert parts[cause] > parts[{"scale": "offset", "offset": "scale"}[cause]]
    # a constant at the median of a skewed attribute: R² below zero, all of it offset
    const = metrics.r2_parts(y, np.full_like(y, np.median(y)))
    assert const["tracked"] == 0 and const["scale"] == 0 and const["r2"] < 0
    assert np.isnan(metrics.r2_parts(np.ones(5), np.arange(5.0))["r2"])
    with pytest.raises(ValueError):
        metrics.r2_parts(y, y[:-1])


def test_r2_parts_table_scores_parsed_replies_in_registry_order():
    pred = pd.DataFrame({"attribute": ["B"] * 3 + ["areaMM2"] * 4,
                         "true": [1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0],
                         "pred": [1.0, 2.0, np.nan, 2.0, 3.0, 4.0, 5.0]})
    t = metrics.r2_parts_table(pred)
    assert list(t.attribute) == ["areaMM2", "B"] and list(t.n) == [4, 2]
    a = t.set_index("attribute").loc["areaMM2"]
    assert a.tracked == pytest.approx(1.0) and a.scale == pytest.approx(0.0)
    assert a.offset == pytest.approx(1 / 1.25) and a.r2 == pytest.approx(metrics.r2_score([1, 2, 3, 4], [2, 3, 4, 5]))
    with pytest.raises(KeyError, match="nope"):
        metrics.r2_parts_table(pred.assign(attribute="nope"))


def _r2_frame(values, lo=None, hi=None):
    import pandas as pd
    names = list(attributes.NAMES[:len(values)])
    t = pd.DataFrame({"attribute": names, "r2": values})
    if lo is not None:
        t["r2_lo"], t["r2_hi"] = lo, hi
    return t


def test_r2_sentence_reads_range_median_and_what_holds_beyond_noise():
    t = _r2_frame([0.9, 0.75, 0.5, -0.3], lo=[0.8, 0.6, 0.3, -0.5], hi=[0.95, 0.85, 0.6, -0.1])
    text = metrics.r2_sentence(t, 500, "default", "median", 0.001)
    assert f"between -0.30 ({t.attribute[3]}) and 0.90 ({t.attribute[0]})" in text
    assert "median 0.62" in text and "2 of 4 attributes reach 0.70 (1 with the whole 95% interval above it)" in text
    assert f"below zero beyond noise: {t.attribute[3]}" in text and "0.10% of the replies" in text
    t2 = _r2_frame([0.9, -0.1], lo=[0.8, -0.3], hi=[0.95, 0.05])
    assert "none is below zero beyond noise" in metrics.r2_sentence(t2, 10, "smoke", "greedy", 0)
    assert "no reply was a number" in metrics.r2_sentence(_r2_frame([np.nan]), 10, "smoke", "greedy", 1.0)


def test_r2_parts_sentence_names_offset_driven_attributes():
    import pandas as pd
    rng = np.random.default_rng(0)
    y = rng.lognormal(size=400)                       # right-skewed: mean above median
    p = np.full_like(y, np.median(y))                 # replies at the typical value
    z = rng.normal(size=400)
    pred = pd.DataFrame({"attribute": ["areaMM2"] * 400 + ["B"] * 400, "true": np.r_[y, z],
                         "pred": np.r_[p, z + rng.normal(0, 0.01, 400)]})
    parts = metrics.r2_parts_table(pred)
    train = pd.DataFrame({"areaMM2": rng.lognormal(size=300), "B": rng.normal(size=300)})
    text = metrics.r2_parts_sentence(parts, pred, train)
    assert text.startswith("For 1 of 2 attributes")
    assert "Below zero: **areaMM2**" in text and "areaMM2 is right-skewed in training" in text
    assert "**B**" not in text


def test_medians_sentence_per_reading():
    import pandas as pd
    t = pd.concat([_r2_frame([0.9, 0.5]).assign(reading="greedy"), _r2_frame([0.8, 0.75]).assign(reading="median")])
    assert metrics.medians_sentence(t, "On 2 images") == (
        "On 2 images: greedy: R² median 0.70, 1 of 2 attributes at 0.70 or more; "
        "median: R² median 0.78, 2 of 2 attributes at 0.70 or more.")


def test_ridge_readout_in_chunks_is_the_whole_array_ridge():
    """Read in blocks of rows (bounded memory), the read-out is the closed-form ridge on the whole
    standardised matrix, NaN values left out, whatever the block size."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 12)).astype(np.float32) * rng.uniform(0.5, 3, 12) + 4
    y = x[:, :3].sum(1) + rng.normal(size=300)
    y[::17] = np.nan
    tr, te = slice(0, 200), slice(200, 300)
    ok, okt = np.isfinite(y[tr]), np.isfinite(y[te])
    xt = x[tr][ok].astype(np.float64)
    mu, sd = xt.mean(0), xt.std(0)
    a = (xt - mu) / sd
    w = np.linalg.solve(a.T @ a + 0.05 * len(a) * np.eye(12), a.T @ (y[tr][ok] - y[tr][ok].mean()))
    pred = ((x[te][okt] - mu) / sd) @ w + y[tr][ok].mean()
    want = 1 - ((y[te][okt] - pred) ** 2).sum() / ((y[te][okt] - y[te][okt].mean()) ** 2).sum()
    for chunk in (7, 64, 10_000):
        r2, ntr, nte = metrics.ridge_readout_r2(x[tr], y[tr], x[te], y[te], lam=0.05, chunk=chunk)
        assert r2 == pytest.approx(want, abs=1e-10) and (ntr, nte) == (ok.sum(), okt.sum())
