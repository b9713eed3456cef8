"""Malignancy probes: the challenge's partial AUC against an independent computation, the patient
bootstrap, no test row in any fit, missing values imputed and counted, the written tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinlib import attributes, malignancy

REAL_5K = "isic2024-metadata-sample5k.csv"


# ---------------------------------------------------------------------------- an independent pAUC
def _roc_points(y, s):
    """ROC of 'positive when score >= threshold', one point per distinct score, by counting."""
    pts = [(0.0, 0.0)]
    for t in np.unique(s)[::-1]:
        pts.append((np.mean(s[y == 0] >= t), np.mean(s[y == 1] >= t)))
    return np.array(pts)


def _area_above(points, level):
    """Exact integral of max(TPR - level, 0) over FPR along the straight segments between points."""
    total = 0.0
    for (x0, t0), (x1, t1) in zip(points[:-1], points[1:]):
        a, b = t0 - level, t1 - level
        if a >= 0 and b >= 0:
            total += (x1 - x0) * (a + b) / 2
        elif a > 0 or b > 0:               # the segment crosses the level: keep the part above
            hi = max(a, b)
            total += (x1 - x0) * hi / (abs(a) + abs(b)) * hi / 2
    return total


@pytest.mark.parametrize("seed", range(6))
def test_partial_auc_matches_direct_integration(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = (rng.random(n) < rng.uniform(0.1, 0.5)).astype(int)
    y[:2] = [0, 1]
    s = y * rng.uniform(0, 2) + rng.normal(size=n)
    if seed % 2:                           # ties, within and across the classes
        s = np.round(s * 2) / 2
    for level in (0.8, 0.5):
        want = _area_above(_roc_points(y, s), level)
        assert malignancy.partial_auc(y, s, min_tpr=level) == pytest.approx(want, abs=1e-12)


def test_partial_auc_extremes():
    y = np.array([0] * 30 + [1] * 10)
    s = np.arange(40.0)
    assert malignancy.partial_auc(y, s) == pytest.approx(0.2)         # perfect
    assert malignancy.partial_auc(y, -s) == pytest.approx(0.0)        # reversed
    assert malignancy.partial_auc(y, np.zeros(40)) == pytest.approx(0.2 ** 2 / 2)   # the diagonal
    assert malignancy.partial_auc(y, s, min_tpr=0.5) == pytest.approx(0.5)
    assert malignancy.roc_auc(y, s) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0 or 1"):
        malignancy.partial_auc(np.array([0, 1, 2]), np.arange(3.0))


def test_weights_are_repeated_rows_and_the_fast_curve_agrees():
    rng = np.random.default_rng(5)
    y = (rng.random(120) < 0.3).astype(int)
    s = np.round(y + rng.normal(size=120), 1)                    # many ties
    w = rng.integers(0, 4, 120)
    w[np.flatnonzero(y)[:1]] = 1
    w[np.flatnonzero(1 - y)[:1]] = 1
    rep = np.repeat(np.arange(120), w)
    pauc_w = malignancy.partial_auc(y, s, sample_weight=w)
    assert pauc_w == pytest.approx(malignancy.partial_auc(y[rep], s[rep]), abs=1e-12)
    auc, pauc = malignancy._WeightedROC(y, s)(w)
    assert auc == pytest.approx(malignancy.roc_auc(y[rep], s[rep]), abs=1e-12)
    assert pauc == pytest.approx(pauc_w, abs=1e-12)


# ---------------------------------------------------------------------------- bootstrap
def _scored(rng, n_pat=80):
    patients = np.repeat([f"P{k}" for k in range(n_pat)], rng.integers(1, 8, n_pat))
    y = (rng.random(len(patients)) < 0.2).astype(int)
    return y, y + rng.normal(size=len(y)), patients


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    y, s, p = _scored(np.random.default_rng(0))
    a = malignancy.bootstrap_intervals(y, s, p, n_boot=300, seed=1)
    assert a == malignancy.bootstrap_intervals(y, s, p, n_boot=300, seed=1)
    assert a != malignancy.bootstrap_intervals(y, s, p, n_boot=300, seed=2)
    assert a["auc_lo"] < malignancy.roc_auc(y, s) < a["auc_hi"]
    assert a["pauc_lo"] < malignancy.partial_auc(y, s) < a["pauc_hi"]


def test_bootstrap_resamples_patients_not_lesions():
    """All 30 malignant lesions belong to one of 40 patients: a resample of patients misses that
    patient about a third of the time (such resamples are counted), one of lesions never would."""
    patients = np.repeat([f"P{k}" for k in range(40)], [30] + [5] * 39)
    y = (patients == "P0").astype(int)
    s = np.random.default_rng(0).normal(size=len(y)) + y
    out = malignancy.bootstrap_intervals(y, s, patients, n_boot=200, seed=0)
    assert 40 < out["n_skipped"] < 110


# ---------------------------------------------------------------------------- probes
def _study(seed=0, n_train_pat=150, n_test_pat=70):
    """Labels drawn from a logistic model of 16 attribute-like columns, patients of 1-7 lesions;
    some attribute values missing. Returns (train, test, x_train, x_test, beta)."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(0, 1, 16) * (rng.random(16) < 0.5)

    def part(n_pat, tag):
        pats = np.repeat([f"{tag}{k}" for k in range(n_pat)], rng.integers(1, 8, n_pat))
        x = rng.normal(size=(len(pats), 16)) * 2 + 5
        y = (rng.random(len(pats)) < 1 / (1 + np.exp(-(-2.5 + (x - 5) / 2 @ beta)))).astype(int)
        x[rng.random(x.shape) < 0.03] = np.nan
        frame = pd.DataFrame({"isic_id": [f"{tag}_{i}" for i in range(len(pats))], "patient_id": pats,
                              "target": y})
        return frame, x

    (tr, x_tr), (te, x_te) = part(n_train_pat, "A"), part(n_test_pat, "B")
    return tr, te, x_tr, x_te, beta


@pytest.fixture(scope="module")
def study():
    tr, te, x_tr, x_te, beta = _study()
    rng = np.random.default_rng(1)
    pred_te = x_te + rng.normal(size=x_te.shape) * 2
    emb = (rng.normal(size=(len(tr), 8)), rng.normal(size=(len(te), 8)))
    sets = malignancy.feature_sets(true_train=x_tr, true_test=x_te, predicted_test=pred_te,
                                   embeddings={"h_im untuned": emb})
    res = malignancy.run_probes(sets, tr, te, n_boot=100)
    return tr, te, sets, res, beta


def test_results_table_and_what_was_left_out(study):
    tr, te, sets, res, beta = study
    assert tuple(res.table.columns) == malignancy.RESULT_COLUMNS
    assert list(res.table.features) == ["h_im untuned", "predicted attributes (fit on true)", "true attributes"]
    assert set(res.skipped) == {"h_im fine-tuned", "baseline encoder", "predicted attributes (fit on predicted)"}
    row = res.table.set_index("features").loc["true attributes"]
    assert row.n_test == len(te) and row.n_malignant == te.target.sum()
    assert row.auc_lo <= row.auc <= row.auc_hi and row.pauc_lo <= row.pauc <= row.pauc_hi
    assert row.c in malignancy.C_GRID
    t = res.table.set_index("features").auc
    # labels drawn from the true attributes: they beat noisy copies, which beat random vectors
    assert t["true attributes"] > t["predicted attributes (fit on true)"] > t["h_im untuned"] - 0.02
    big = np.abs(beta) > 0.5
    assert (np.sign(res.probes["true attributes"].coef[big]) == np.sign(beta[big])).all()
    assert tuple(res.scores.columns) == malignancy.SCORE_COLUMNS and len(res.scores) == 3 * len(te)


def test_test_rows_never_reach_a_fit(study):
    """Permuting the test labels and replacing the test features leaves every fitted number as it
    was: imputation medians, standardisation, the chosen C, the coefficients."""
    tr, te, sets, res, _ = study
    rng = np.random.default_rng(7)
    te2 = te.assign(target=rng.permutation(te.target.to_numpy()))
    sets2 = {k: (x_tr, rng.permutation(x_te) * 3 - 1) for k, (x_tr, x_te) in sets.items()}
    res2 = malignancy.run_probes(sets2, tr, te2, n_boot=100)
    for k, p in res.probes.items():
        q = res2.probes[k]
        assert p.c == q.c, k
        for f in ("medians", "mean", "scale", "coef"):
            np.testing.assert_array_equal(getattr(p, f), getattr(q, f), err_msg=f"{k} {f}")
        assert p.intercept == q.intercept
    assert not res.table.auc.equals(res2.table.auc)        # the scores did change


def test_missing_values_are_imputed_with_training_medians_and_counted(study):
    tr, te, sets, res, _ = study
    x_tr, x_te = sets["true attributes"]
    row = res.table.set_index("features").loc["true attributes"]
    assert row.n_imputed_train == np.isnan(x_tr).sum() > 0
    assert row.n_imputed_test == np.isnan(x_te).sum() > 0
    probe = res.probes["true attributes"]
    np.testing.assert_allclose(probe.medians, np.nanmedian(x_tr, axis=0))
    filled = np.where(np.isnan(x_te), np.nanmedian(x_tr, axis=0), x_te)
    np.testing.assert_allclose(probe.score(x_te), probe.score(filled))
    assert np.isfinite(res.scores.score).all()
    with pytest.raises(ValueError, match="no training row has a value for B"):
        bad = x_tr.copy()
        bad[:, attributes.NAMES.index("B")] = np.nan
        malignancy.fit_probe(bad, tr.target, tr.patient_id, attributes.NAMES)


def test_contributions_sum_to_the_score(study):
    tr, te, sets, res, _ = study
    probe = res.probes["true attributes"]
    x_te = sets["true attributes"][1]
    c = malignancy.contributions(probe, x_te, te.isic_id)
    assert list(c.columns) == ["isic_id", *attributes.NAMES, "intercept", "score"]
    np.testing.assert_allclose(c[list(attributes.NAMES)].sum(axis=1) + c.intercept, c.score)
    mine = res.scores[res.scores.features == "true attributes"].score.to_numpy()
    np.testing.assert_allclose(c.score, mine)
    coefs = malignancy.coefficients(probe)
    assert sorted(coefs.feature) == sorted(attributes.NAMES)
    assert (np.diff(coefs.coef.abs()) <= 0).all()


def test_cv_folds_keep_patients_together():
    """Labels are per patient and the features only say which patient a lesion is from: nothing
    carries over to new patients, so cross-validation by patient scores chance. Folds of lesions
    (each lesion its own group) let a probe recognise the patients and score far above it."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(80), 8)
    x = rng.normal(size=(80, 60))[patients] + 0.1 * rng.normal(size=(len(patients), 60))
    y = (rng.random(80) < 0.3).astype(int)[patients]
    grid = (1e-2, 1.0, 100.0)
    c, cv = malignancy.choose_c(x, y, patients, grid)
    assert list(cv.columns) == ["c", "cv_auc", "cv_auc_sd"] and list(cv.c) == list(grid)
    assert c == cv.c[cv.cv_auc.idxmax()]
    assert cv.cv_auc.max() < 0.7
    _, by_lesion = malignancy.choose_c(x, y, np.arange(len(y)), grid)
    assert by_lesion.cv_auc.max() > 0.9
    few = np.zeros(len(y), int)
    few[:24] = 1                                          # three patients only: three folds
    _, cv3 = malignancy.choose_c(x, few, patients, grid)
    assert cv3.attrs["folds"] == 3 and cv.attrs["folds"] == 5
    one = np.zeros(len(y), int)
    one[:8] = 1                                           # one patient: nothing to validate on
    with pytest.raises(ValueError, match="1 training patient.*at least 2"):
        malignancy.choose_c(x, one, patients)


def test_run_probes_rejects_bad_input(study):
    tr, te, sets, _, _ = study
    with pytest.raises(ValueError, match="both train and test"):
        malignancy.run_probes(sets, tr, te.assign(patient_id=tr.patient_id.iloc[0]), n_boot=10)
    with pytest.raises(ValueError, match="true attributes \\(test\\): 5 feature rows"):
        malignancy.run_probes({"true attributes": (sets["true attributes"][0], np.zeros((5, 16)))}, tr, te)
    with pytest.raises(ValueError, match="infinite"):
        x = sets["true attributes"][1].copy()
        x[3, 2] = np.inf
        malignancy.run_probes({"true attributes": (sets["true attributes"][0], x)}, tr, te)
    with pytest.raises(ValueError, match="unknown feature set"):
        malignancy.run_probes({"h_im": sets["true attributes"]}, tr, te)
    with pytest.raises(ValueError, match="test labels: missing column"):
        malignancy.run_probes(sets, tr, te.drop(columns="target"))


def test_write_results(study, tmp_path):
    res = study[3]
    table_path, scores_path = malignancy.write_results(res, tmp_path)
    assert table_path == tmp_path / "metrics" / "malignancy.csv"
    assert scores_path == tmp_path / "metrics" / "malignancy_scores.csv"
    back = pd.read_csv(table_path)
    assert tuple(back.columns) == malignancy.RESULT_COLUMNS
    pd.testing.assert_frame_equal(back, res.table, check_dtype=False)
    assert tuple(pd.read_csv(scores_path).columns) == malignancy.SCORE_COLUMNS


def test_predicted_attributes_from_a_prediction_frame():
    pred = pd.DataFrame({"isic_id": ["a", "a", "b"], "attribute": ["areaMM2", "B", "areaMM2"],
                         "pred": [3.0, np.nan, 4.0]})
    arr, n_nan = malignancy.predicted_attributes(pred, ["b", "a"])
    assert arr.shape == (2, 16) and arr[0, 0] == 4.0 and arr[1, 0] == 3.0
    assert n_nan == 32 - 2
    with pytest.raises(ValueError, match="no prediction for 1 id"):
        malignancy.predicted_attributes(pred, ["a", "c"])
    with pytest.raises(ValueError, match="unknown attribute"):
        malignancy.predicted_attributes(pred.assign(attribute="size"), ["a"])


# ---------------------------------------------------------------------------- benign vs malignant
def test_attribute_differences_on_the_real_rows(fixtures_dir):
    real = pd.read_csv(fixtures_dir / REAL_5K)
    d = malignancy.attribute_differences(real).set_index("attribute")
    named = attributes.named(real, keep=("target",))
    iqr = named[list(attributes.NAMES)].quantile(0.75) - named[list(attributes.NAMES)].quantile(0.25)
    med = named.groupby("target")[list(attributes.NAMES)].median()
    np.testing.assert_allclose(d.difference, (med.loc[1] - med.loc[0]) / iqr)
    assert (d.n_malignant == real.target.sum()).all()
    # the medians the brief quotes: malignant lesions are larger, more varied in colour, bluer
    assert (d.difference[["areaMM2", "perimeterMM", "norm_color"]] > 0).all()
    assert (d.difference[["deltaB", "B"]] < 0).all()
    # short names with missing values work as well; the missing ones are counted
    nan = named.assign(norm_color=named.norm_color.where(named.norm_color > 0))
    out = malignancy.attribute_differences(nan).set_index("attribute")
    assert out.n_missing["norm_color"] == (named.norm_color == 0).sum() > 0
    with pytest.raises(ValueError, match="no target"):
        malignancy.attribute_differences(named.drop(columns="target"))


# ---------------------------------------------------------------------------- figures
def test_figures_draw_what_they_are_given(study, tmp_path):
    import matplotlib.pyplot as plt

    from skinlib import malignancy_figures

    tr, te, sets, res, _ = study
    fig = malignancy_figures.roc_curves(res.scores, table=res.table)
    left, zoom = fig.axes
    assert len(left.get_legend().get_texts()) == len(res.table)
    assert all(r.features in t.get_text() for r, t in zip(res.table.itertuples(), left.get_legend().get_texts()))
    assert zoom.get_ylim()[0] == pytest.approx(0.8)
    plt.close(fig)
    fig = malignancy_figures.coefficients(malignancy.coefficients(res.probes["true attributes"]))
    assert len(fig.axes[0].patches) == 16
    plt.close(fig)
    contrib = malignancy.contributions(res.probes["true attributes"], sets["true attributes"][1], te.isic_id)
    fig = malignancy_figures.contributions(contrib.iloc[0], attributes.NAMES)
    assert sorted(p.get_width() for p in fig.axes[0].patches) == pytest.approx(sorted(contrib.iloc[0][list(attributes.NAMES)]))
    plt.close(fig)
    with pytest.raises(ValueError, match="missing column"):
        malignancy_figures.roc_curves(res.scores.drop(columns="target"))


def test_the_comparison_sentence_reads_the_table_with_its_intervals(study):
    _, te, _, res, _ = study
    text = malignancy.comparison_sentence(res.table)
    t = res.table.set_index("features")
    a = t.loc["true attributes"]
    assert f"The measured attributes give pAUC {a.pauc:.3f} [{a.pauc_lo:.3f}, {a.pauc_hi:.3f}]" in text
    assert f"h_im untuned: pAUC {t.loc['h_im untuned'].pauc:.3f}" in text
    assert f"All on {len(te)} test images with {int(te.target.sum())} malignant" in text
    assert "h_im fine-tuned" not in text            # a set that was not scored is not read out
    assert malignancy.comparison_sentence(res.table.iloc[:0]) == ""


def test_the_difference_figure_draws_each_source(fixtures_dir):
    from skinlib import malignancy_figures
    real = malignancy.attribute_differences(pd.read_csv(fixtures_dir / REAL_5K))
    half = real.assign(difference=real.difference / 2)
    fig = malignancy_figures.attribute_differences({"real": real, "half": half})
    ax = fig.axes[0]
    widths = [p.get_width() for p in ax.patches]
    assert widths[:16] == pytest.approx(list(real.difference)) and widths[16:] == pytest.approx(list(half.difference))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["real", "half"]


# ---------------------------------------------------------------------------- the saved probe
def test_a_saved_probe_loads_and_scores_exactly_as_the_fitted_one(study, tmp_path):
    from skinlib import resumable
    tr, te, sets, res, _ = study
    probe = res.probes["predicted attributes (fit on true)"]
    path = malignancy.save_probe(probe, tmp_path / "probe.json")
    assert resumable.check(path, malignancy.PROBE_JOB) is None
    assert "\\u" not in path.read_text() and path.read_text().lstrip().startswith("{")  # plain JSON
    back = malignancy.load_probe(path)
    x_te = sets["predicted attributes (fit on true)"][1]   # holds missing values: imputation too
    assert np.isnan(x_te).any()
    np.testing.assert_array_equal(back.score(x_te), probe.score(x_te))
    mine = res.scores[res.scores.features == "predicted attributes (fit on true)"].score.to_numpy()
    np.testing.assert_array_equal(back.score(x_te), mine)
    assert (back.c, back.intercept, back.names) == (probe.c, probe.intercept, list(attributes.NAMES))
    # one lesion: probability, and contributions that with the intercept sum to the log-odds
    for i in (0, int(np.flatnonzero(np.isnan(x_te).any(axis=1))[0])):
        one = malignancy.explain(back, x_te[i])
        assert one["log_odds"] == pytest.approx(mine[i], abs=1e-12)
        assert one["probability"] == pytest.approx(1 / (1 + np.exp(-mine[i])))
        assert sum(one["contributions"]) + one["intercept"] == pytest.approx(one["log_odds"])
        np.testing.assert_allclose(one["contributions"], probe.contributions(x_te[i:i + 1])[0])
        assert one["n_imputed"] == int(np.isnan(x_te[i]).sum())
    assert malignancy.explain(back, np.full(16, np.nan))["n_imputed"] == 16
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # far from the boundary: 0 or 1, without an overflow
        assert {malignancy.explain(back, np.full(16, s))["probability"] for s in (1e9, -1e9)} <= {0.0, 1.0}
    with pytest.raises(ValueError, match="15 values for the probe.s 16 features"):
        malignancy.explain(back, x_te[0][:15])


def test_loading_a_probe_refuses_an_unsealed_altered_or_foreign_file(study, tmp_path):
    from skinlib import resumable
    probe = study[3].probes["true attributes"]
    path = malignancy.save_probe(probe, tmp_path / "probe.json")
    with pytest.raises(ValueError, match=r"probe\.json.*features"):
        malignancy.load_probe(path, names=list(attributes.NAMES)[::-1])
    path.write_text(path.read_text().replace('"c":', '"c": 0.0, "was_c":'))  # altered after sealing
    with pytest.raises(ValueError, match=r"probe\.json: (contents differ|.*sealed with)"):
        malignancy.load_probe(path)
    resumable.seal_path(path).unlink()
    with pytest.raises(ValueError, match=r"probe\.json: not sealed"):
        malignancy.load_probe(path)
    with pytest.raises(ValueError, match=r"nothing\.json: missing"):
        malignancy.load_probe(tmp_path / "nothing.json")
