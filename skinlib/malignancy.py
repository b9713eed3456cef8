"""From grounded attributes to malignancy: logistic probes, the challenge's metric, patient bootstrap.

The paper grounds a multimodal model in quantitative lesion attributes because such attributes
predict malignancy. This module asks how much of SLICE-3D's `target` each kind of feature carries:

  h_im fine-tuned / h_im untuned / baseline encoder   image vectors the caller passes
  predicted attributes (fit on true)       probe fitted on the training images' true 16 attributes,
                                           applied to the test images' predicted ones
  predicted attributes (fit on predicted)  fitted and applied on predicted attributes (needs
                                           predictions on training images; optional)
  true attributes                          the 16 measured attributes; on the phantom, where the
                                           label was drawn from them, the ceiling

Each probe: median imputation of missing values (training medians, counted), standardisation,
L2 logistic regression with C from `C_GRID` chosen by patient-grouped stratified 5-fold
cross-validation on the training rows only, refitted on all training rows and scored once on the
test rows. Scores are the probe's log-odds. Metrics: ROC-AUC and the ISIC 2024 challenge's partial
AUC above 80 % TPR (0-0.2), each with a 95 % interval from a bootstrap over test patients.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import attributes, config, intervals

FEATURE_SETS = ("h_im fine-tuned", "h_im untuned", "baseline encoder",
                "predicted attributes (fit on true)", "predicted attributes (fit on predicted)",
                "true attributes")
EMBEDDING_SETS = FEATURE_SETS[:3]
ATTRIBUTE_SETS = FEATURE_SETS[3:]
C_GRID = tuple(float(f"{c:.3g}") for c in 10.0 ** np.arange(-5, 1.01, 0.5))   # 1e-5 ... 1e1
FOLDS = 5
MIN_TPR = 0.8          # the challenge scored the ROC above 80 % TPR
N_BOOT = 1000
LEVEL = 0.95
MAX_ITER = 5000
RESULT_COLUMNS = ("features", "auc", "auc_lo", "auc_hi", "pauc", "pauc_lo", "pauc_hi", "n_test",
                  "n_malignant", "c", "folds", "n_imputed_train", "n_imputed_test")
SCORE_COLUMNS = ("isic_id", "features", "score", "target")
LABEL_COLUMNS = ("isic_id", "patient_id", "target")


# ============================================================================ metrics
def _labels(y, where: str = "labels") -> np.ndarray:
    """`y` as an int array of 0/1; a clear error for anything else."""
    y = np.asarray(y)
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise ValueError(f"{where}: target must be 0 or 1; {bad.sum()} row(s) differ, "
                         f"first at row {int(np.flatnonzero(bad)[0])}: {y[bad][0]!r}")
    return y.astype(int)


def roc_auc(y, score, sample_weight=None) -> float:
    """Area under the ROC curve (sklearn)."""
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(_labels(y), score, sample_weight=sample_weight))


def _partial_area(fpr, tpr, max_fpr: float) -> float:
    """Trapezoid area under the ROC points (fpr ascending) up to fpr = max_fpr, the point at
    max_fpr linearly interpolated between its neighbours."""
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    # fpr ends at 1 > max_fpr, so fpr[stop] exists
    t_end = np.interp(max_fpr, fpr[stop - 1:stop + 1], tpr[stop - 1:stop + 1])
    x = np.append(fpr[:stop], max_fpr)
    t = np.append(tpr[:stop], t_end)
    return float(np.sum(np.diff(x) * (t[1:] + t[:-1]) / 2))


def partial_auc(y, score, min_tpr: float = MIN_TPR, sample_weight=None) -> float:
    """The ISIC 2024 metric: area under the ROC curve above `min_tpr` true positive rate.

    As the challenge computed it: flip the labels and negate the scores, so that TPR >= min_tpr
    becomes FPR' <= 1 - min_tpr; take that part of the flipped ROC (sklearn), add its point at
    FPR' = 1 - min_tpr by linear interpolation, integrate with the trapezoid rule. Range
    0 to 1 - min_tpr (0.2 for a perfect ranking; a random one about (1 - min_tpr)² / 2).
    """
    from sklearn.metrics import roc_curve

    y = _labels(y)
    fpr, tpr, _ = roc_curve(1 - y, -np.asarray(score, dtype=float), sample_weight=sample_weight)
    return _partial_area(fpr, tpr, 1.0 - min_tpr)


class _WeightedROC:
    """AUC and pAUC of fixed scores under many weightings of the rows (the bootstrap's resamples).

    The scores are sorted and their ties grouped once; each weighting is then two weighted
    counts per tie group and their running sums, instead of a sort per resample. Tied scores
    share one ROC point, as in sklearn's curve, so both metrics equal `roc_auc` / `partial_auc`
    with the same sample_weight (a test checks it).
    """

    def __init__(self, y, score):
        order = np.argsort(-np.asarray(score, dtype=float), kind="stable")
        s = np.asarray(score, dtype=float)[order]
        self.order, self.y = order, np.asarray(y)[order]
        self.group = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])])
        self.n_groups = int(self.group[-1]) + 1

    def __call__(self, weight, min_tpr: float = MIN_TPR):
        """(auc, pauc) with row weights `weight` (original row order); None if one class weighs 0."""
        w = np.asarray(weight, dtype=float)[self.order]
        tp = np.cumsum(np.bincount(self.group, weights=w * self.y, minlength=self.n_groups))
        fp = np.cumsum(np.bincount(self.group, weights=w * (1 - self.y), minlength=self.n_groups))
        if tp[-1] <= 0 or fp[-1] <= 0:
            return None
        tpr = np.concatenate([[0.0], tp / tp[-1]])
        fpr = np.concatenate([[0.0], fp / fp[-1]])
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        # the flipped curve (labels 1 - y, scores negated) is this one seen from (1, 1)
        return auc, _partial_area(1 - tpr[::-1], 1 - fpr[::-1], 1.0 - min_tpr)


def bootstrap_intervals(y, score, patients, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
                        min_tpr: float = MIN_TPR) -> dict:
    """Percentile intervals of AUC and pAUC over `n_boot` resamples of the test patients.

    Whole patients are drawn with replacement (their lesions are not independent); a patient drawn
    k times weighs k. The draws are `skinlib.intervals.patient_draws`, as for the other chapters'
    intervals, and the same for every feature set scored on the same test rows and seed. A
    resample holding only one class cannot be scored: such resamples are counted (`n_skipped`),
    not hidden. Returns auc_lo, auc_hi, pauc_lo, pauc_hi, n_boot, n_skipped.
    """
    y = _labels(y, "bootstrap")
    if len(patients) != len(y) or len(score) != len(y):
        raise ValueError(f"bootstrap: {len(y)} labels, {len(score)} scores, {len(patients)} patient ids")
    codes, counts = intervals.patient_draws(patients, n_boot, seed)
    curve = _WeightedROC(y, score)
    draws = [curve(c[codes], min_tpr) for c in counts]
    kept = np.array([d for d in draws if d is not None])
    if not len(kept):
        raise ValueError(f"bootstrap: none of {n_boot} patient resamples held both classes")
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    (a_lo, p_lo), (a_hi, p_hi) = np.percentile(kept, q, axis=0)
    return {"auc_lo": float(a_lo), "auc_hi": float(a_hi), "pauc_lo": float(p_lo), "pauc_hi": float(p_hi),
            "n_boot": int(n_boot), "n_skipped": int(n_boot - len(kept))}


# ============================================================================ probes
@dataclass
class Probe:
    """A fitted probe: imputation medians, standardisation, logistic coefficients, the CV table."""
    names: list[str]
    c: float
    medians: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray          # on the standardised features
    intercept: float
    cv: pd.DataFrame          # c, cv_auc (mean over folds), cv_auc_sd
    converged: bool
    n_imputed_train: int = 0
    folds: int = FOLDS        # fewer where fewer training patients have a malignant lesion

    def standardise(self, x) -> np.ndarray:
        x, _ = impute(x, self.medians)
        return (x - self.mean) / self.scale

    def contributions(self, x) -> np.ndarray:
        """(n, d) standardised value × coefficient: with the intercept they sum to the log-odds."""
        return self.standardise(x) * self.coef

    def score(self, x) -> np.ndarray:
        """Log-odds of malignancy."""
        return self.contributions(x).sum(axis=1) + self.intercept


def _matrix(x, where: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{where}: features must be a 2-D array (rows, features), got shape {x.shape}")
    inf = np.isinf(x)
    if inf.any():
        r, c = np.argwhere(inf)[0]
        raise ValueError(f"{where}: {inf.sum()} infinite value(s), first at row {r}, feature {c}")
    return x


def training_medians(x, names=None, where: str = "features") -> np.ndarray:
    """Per-feature median over the rows that have a value; a feature with none is an error."""
    x = _matrix(x, where)
    empty = np.isnan(x).all(axis=0)
    if empty.any():
        names = list(names) if names is not None else [str(j) for j in range(x.shape[1])]
        raise ValueError(f"{where}: no training row has a value for {', '.join(np.asarray(names)[empty][:5])}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=0)


def impute(x, medians) -> tuple[np.ndarray, int]:
    """NaNs replaced by `medians` (per feature); returns (array, how many were replaced)."""
    x = np.array(x, dtype=np.float64)
    miss = np.isnan(x)
    x[miss] = np.broadcast_to(medians, x.shape)[miss]
    return x, int(miss.sum())


def _pipeline(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))


def _fit(x, y, c):
    from sklearn.exceptions import ConvergenceWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = _pipeline(c).fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _path_aucs(x_tr, y_tr, x_va, y_va, grid) -> list[float]:
    """Validation AUC of the probe at each C of the ascending `grid`, fitted along the path: each
    fit starts from the previous C's coefficients (warm start), so the weakly regularised end of
    the grid, the slow one, starts near its answer (bench/probes.py: the same C and AUCs, several
    times faster than a cold fit per C). The scaler is fitted once per fold, as the pipeline would."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_tr)
    xs_tr, xs_va = scaler.transform(x_tr), scaler.transform(x_va)
    lr = LogisticRegression(max_iter=MAX_ITER, warm_start=True)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)   # the final refit reports convergence
        for c in grid:
            out.append(roc_auc(y_va, lr.set_params(C=c).fit(xs_tr, y_tr).decision_function(xs_va)))
    return out


def choose_c(x, y, groups, grid=C_GRID, folds: int = FOLDS, seed: int = 0) -> tuple[float, pd.DataFrame]:
    """C with the best mean ROC-AUC over patient-grouped stratified folds of (x, y); ties go to the
    smaller C (stronger regularisation). AUC, not pAUC, picks C: on a validation fold of a few
    dozen malignant lesions the partial area rests on a handful of them.

    Every validation fold needs a malignant lesion, so with fewer training patients with one than
    `folds` (a small release), as many folds as there are such patients, at least 2; the number
    used is `cv.attrs["folds"]` (and the probe's `folds`), shown beside C."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = _labels(y, "choose_c")
    groups = np.asarray(groups)
    n_pos = len(np.unique(groups[y == 1]))
    if n_pos < 2:
        raise ValueError(f"choose_c: {n_pos} training patient(s) with a malignant lesion: "
                         f"cross-validation needs at least 2")
    folds = min(folds, n_pos)
    splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, groups))
    for k, (_, va) in enumerate(splits):
        if y[va].min() == y[va].max():
            raise ValueError(f"choose_c: validation fold {k} holds only one class")
    grid = sorted(float(c) for c in grid)
    aucs = np.array([_path_aucs(x[tr], y[tr], x[va], y[va], grid) for tr, va in splits])   # (folds, C)
    cv = pd.DataFrame({"c": grid, "cv_auc": aucs.mean(0), "cv_auc_sd": aucs.std(0)})
    cv.attrs["folds"] = folds
    best = cv["cv_auc"].to_numpy()
    return float(cv["c"][int(np.flatnonzero(best >= best.max() - 1e-12)[0])]), cv


def fit_probe(x, y, groups, names=None, grid=C_GRID, folds: int = FOLDS, seed: int = 0) -> Probe:
    """Impute (training medians), choose C by grouped CV, refit on all rows of (x, y)."""
    x = _matrix(x, "fit_probe")
    names = list(names) if names is not None else [f"f{j}" for j in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise ValueError(f"fit_probe: {len(names)} names for {x.shape[1]} features")
    if len(x) != len(y) or len(x) != len(groups):
        raise ValueError(f"fit_probe: {len(x)} rows, {len(y)} labels, {len(groups)} groups")
    y = _labels(y, "fit_probe")
    medians = training_medians(x, names, "fit_probe")
    x, n_imp = impute(x, medians)
    c, cv = choose_c(x, y, groups, grid, folds, seed)
    model, converged = _fit(x, y, c)
    scaler, lr = model[0], model[1]
    return Probe(names, c, medians, scaler.mean_.copy(), scaler.scale_.copy(), lr.coef_[0].copy(),
                 float(lr.intercept_[0]),
                 cv, converged, n_imp, cv.attrs["folds"])


def coefficients(probe: Probe) -> pd.DataFrame:
    """feature, coef (per SD of the training rows), largest |coef| first: what the probe leans on."""
    out = pd.DataFrame({"feature": probe.names, "coef": probe.coef})
    return out.reindex(out["coef"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def contributions(probe: Probe, x, ids) -> pd.DataFrame:
    """Per lesion: isic_id, one column per feature (standardised value × coefficient), intercept
    and score (their sum, the log-odds), for the explorer."""
    x = _matrix(x, "contributions")
    ids = list(ids)
    if len(ids) != len(x):
        raise ValueError(f"contributions: {len(ids)} ids for {len(x)} rows")
    out = pd.DataFrame(probe.contributions(x), columns=probe.names)
    out.insert(0, "isic_id", ids)
    out["intercept"] = probe.intercept
    out["score"] = probe.score(x)
    return out


# ============================================================================ the saved probe
# Stage 06 keeps the interpretable probe so that the explorer (stage 07) can score any lesion the
# model reads, as JSON (no pickle: a reader of the run should not have to run code to load it).
PROBE_JOB = "06_malignancy attribute probe"
PROBE_FIELDS = ("names", "medians", "mean", "scale", "coef", "intercept", "c", "converged", "n_imputed_train")


def save_probe(probe: Probe, path, fit_on: str = "the training images' true 16 attributes",
               applied_to: str = "the attributes the model reads") -> Path:
    """Write `probe` to `path` as sealed JSON (written whole, then sealed: a killed writer leaves a
    file `load_probe` refuses). `fit_on` / `applied_to` say what it is, for a reader of the file."""
    from . import resumable
    obj = {"names": list(probe.names), "medians": [float(v) for v in probe.medians],
           "mean": [float(v) for v in probe.mean], "scale": [float(v) for v in probe.scale],
           "coef": [float(v) for v in probe.coef], "intercept": float(probe.intercept), "c": float(probe.c),
           "converged": bool(probe.converged), "n_imputed_train": int(probe.n_imputed_train),
           "fit_on": fit_on, "applied_to": applied_to}
    bad = [k for k in ("medians", "mean", "scale", "coef") if not np.isfinite(obj[k]).all()]
    if bad or not np.isfinite(obj["intercept"]):
        raise ValueError(f"save_probe: non-finite {', '.join(bad) or 'intercept'}; {path} not written")
    path = resumable.write_json(path, obj)
    resumable.seal(path, PROBE_JOB)
    return path


def load_probe(path, names=attributes.NAMES) -> Probe:
    """The probe `save_probe` wrote to `path`; a clear error naming the file when it is unsealed,
    altered, incomplete, or for other features than `names` (in that order)."""
    from . import resumable
    wrong = resumable.check(path, PROBE_JOB)
    if wrong:
        raise ValueError(f"malignancy probe: {wrong}")
    obj = resumable.read_json(path)
    missing = [k for k in PROBE_FIELDS if obj is None or k not in obj]
    if missing:
        raise ValueError(f"malignancy probe: {path}: missing field(s) {', '.join(missing)}")
    if list(obj["names"]) != list(names):
        raise ValueError(f"malignancy probe: {path} is for the features {obj['names']}, not {list(names)}")
    arrays = {k: np.asarray(obj[k], dtype=np.float64) for k in ("medians", "mean", "scale", "coef")}
    short = [k for k, v in arrays.items() if v.shape != (len(names),)]
    if short:
        raise ValueError(f"malignancy probe: {path}: {', '.join(short)} not of length {len(names)}")
    return Probe(list(obj["names"]), float(obj["c"]), arrays["medians"], arrays["mean"], arrays["scale"],
                 arrays["coef"], float(obj["intercept"]), pd.DataFrame(columns=["c", "cv_auc", "cv_auc_sd"]),
                 bool(obj["converged"]), int(obj["n_imputed_train"]))


def explain(probe: Probe, values) -> dict:
    """One lesion's score from its len(probe.names) values (NaN: not read; filled with the training
    median, as the probe's fit did): probability of malignancy, log_odds, intercept, contributions
    (standardised value × coefficient per feature, in probe.names order; with the intercept they sum
    to log_odds) and n_imputed, the features filled."""
    x = _matrix(np.asarray(values, dtype=np.float64).reshape(1, -1), "explain")
    if x.shape[1] != len(probe.names):
        raise ValueError(f"explain: {x.shape[1]} values for the probe's {len(probe.names)} features")
    contrib = probe.contributions(x)[0]
    log_odds = float(contrib.sum() + probe.intercept)
    e = np.exp(-abs(log_odds))   # never overflows, however far the lesion lies from the boundary
    return {"probability": float(1 / (1 + e) if log_odds >= 0 else e / (1 + e)), "log_odds": log_odds,
            "intercept": float(probe.intercept), "contributions": [float(v) for v in contrib],
            "n_imputed": int(np.isnan(x).sum())}


# ============================================================================ feature sets
def predicted_attributes(pred: pd.DataFrame, ids, column: str = "pred") -> tuple[np.ndarray, int]:
    """A prediction frame (skinlib.predict: isic_id, attribute, pred, one row per question asked) as
    an (len(ids), 16) array in registry order. Unparsed replies (NaN) and questions not asked stay
    NaN; returns (array, how many are NaN). An id without any prediction is an error."""
    missing = [c for c in ("isic_id", "attribute", column) if c not in pred.columns]
    if missing:
        raise ValueError(f"prediction frame: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(pred["attribute"]) - set(attributes.NAMES))
    if unknown:
        raise ValueError(f"prediction frame: unknown attribute(s) {unknown[:5]}")
    wide = pred.pivot(index="isic_id", columns="attribute", values=column).reindex(columns=list(attributes.NAMES))
    ids = list(ids)
    absent = [i for i in ids if i not in wide.index]
    if absent:
        raise ValueError(f"prediction frame: no prediction for {len(absent)} id(s), e.g. {absent[:5]}")
    arr = wide.loc[ids].to_numpy(dtype=np.float64)
    return arr, int(np.isnan(arr).sum())


def attribute_matrix(frame: pd.DataFrame, ids) -> np.ndarray:
    """The 16 attributes (short-name columns, registry order) of `ids`, NaN where excluded."""
    missing = [n for n in attributes.NAMES if n not in frame.columns]
    if missing:
        raise ValueError(f"attribute frame: missing column(s) {', '.join(missing)}")
    by_id = frame.set_index("isic_id")
    absent = [i for i in ids if i not in by_id.index]
    if absent:
        raise ValueError(f"attribute frame: {len(absent)} id(s) not found, e.g. {list(absent)[:5]}")
    return by_id.loc[list(ids), list(attributes.NAMES)].to_numpy(dtype=np.float64)


def feature_sets(*, true_train, true_test, predicted_test=None, predicted_train=None,
                 embeddings: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The chapter's feature sets as {name: (train array, test array)}, rows in the order of the
    train and test label frames. `embeddings` maps names in EMBEDDING_SETS to (train, test) pairs.
    Sets whose inputs are not given are left out (`missing_sets` says which and why)."""
    embeddings = embeddings or {}
    unknown = sorted(set(embeddings) - set(EMBEDDING_SETS))
    if unknown:
        raise ValueError(f"feature_sets: unknown embedding set(s) {unknown}; known: {EMBEDDING_SETS}")
    sets = {k: embeddings[k] for k in EMBEDDING_SETS if k in embeddings}
    if predicted_test is not None:
        sets["predicted attributes (fit on true)"] = (true_train, predicted_test)
        if predicted_train is not None:
            sets["predicted attributes (fit on predicted)"] = (predicted_train, predicted_test)
    sets["true attributes"] = (true_train, true_test)
    return sets


def missing_sets(sets: dict) -> dict[str, str]:
    """{feature set: why it is not in `sets`} for the sets of FEATURE_SETS that are absent."""
    why = {k: "no vectors given" for k in EMBEDDING_SETS}
    why["predicted attributes (fit on true)"] = "no predicted attributes on the test images"
    why["predicted attributes (fit on predicted)"] = "no predicted attributes on the training images"
    why["true attributes"] = "not given"
    return {k: why[k] for k in FEATURE_SETS if k not in sets}


# ============================================================================ the study
@dataclass
class Results:
    table: pd.DataFrame                    # RESULT_COLUMNS, one row per feature set
    scores: pd.DataFrame                   # SCORE_COLUMNS, one row per (test lesion, feature set)
    probes: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)   # feature set -> reason
    n_boot_skipped: dict = field(default_factory=dict)


def _check_labels(frame: pd.DataFrame, where: str) -> np.ndarray:
    missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
    y = _labels(frame["target"].to_numpy(), where)
    if y.min() == y.max():
        raise ValueError(f"{where}: all {len(y)} rows have target {y[0]}; a probe needs both classes")
    return y


def run_probes(sets: dict, train: pd.DataFrame, test: pd.DataFrame, grid=C_GRID, folds: int = FOLDS,
               seed: int = 0, n_boot: int = N_BOOT, level: float = LEVEL, min_tpr: float = MIN_TPR,
               attribute_names=attributes.NAMES) -> Results:
    """Fit one probe per feature set on the training rows, score it once on the test rows.

    `train` / `test`: isic_id, patient_id, target, one row per row of the arrays in `sets`
    (from `feature_sets`). Nothing of the test rows reaches a fit: imputation medians,
    standardisation, C and coefficients come from the training rows alone.
    """
    y_tr, y_te = _check_labels(train, "training labels"), _check_labels(test, "test labels")
    both = sorted(set(train["patient_id"]) & set(test["patient_id"]))
    if both:
        raise ValueError(f"run_probes: {len(both)} patient(s) in both train and test, e.g. {both[:5]}")
    rows, scores, probes, boot_skipped, fitted = [], [], {}, {}, {}
    for name, (x_tr, x_te) in sets.items():
        key = id(x_tr)   # "fit on true" and "true attributes" share one training array: fit it once
        if name not in FEATURE_SETS:
            raise ValueError(f"run_probes: unknown feature set {name!r}; known: {FEATURE_SETS}")
        x_tr, x_te = _matrix(x_tr, f"{name} (train)"), _matrix(x_te, f"{name} (test)")
        for part, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            if len(x) != len(y):
                raise ValueError(f"{name} ({part}): {len(x)} feature rows for {len(y)} labels")
        if x_tr.shape[1] != x_te.shape[1]:
            raise ValueError(f"{name}: {x_tr.shape[1]} training features, {x_te.shape[1]} test features")
        names = list(attribute_names) if name in ATTRIBUTE_SETS else None
        if key not in fitted:
            fitted[key] = fit_probe(x_tr, y_tr, train["patient_id"].to_numpy(), names, grid, folds, seed)
        probe = fitted[key]
        s = probe.score(x_te)
        n_imp_test = int(np.isnan(x_te).sum())
        ci = bootstrap_intervals(y_te, s, test["patient_id"].to_numpy(), n_boot, seed, level, min_tpr)
        boot_skipped[name] = ci["n_skipped"]
        rows.append({"features": name, "auc": roc_auc(y_te, s), "auc_lo": ci["auc_lo"], "auc_hi": ci["auc_hi"],
                     "pauc": partial_auc(y_te, s, min_tpr), "pauc_lo": ci["pauc_lo"], "pauc_hi": ci["pauc_hi"],
                     "n_test": len(y_te), "n_malignant": int(y_te.sum()), "c": probe.c, "folds": probe.folds,
                     "n_imputed_train": probe.n_imputed_train, "n_imputed_test": n_imp_test})
        scores.append(pd.DataFrame({"isic_id": test["isic_id"].to_numpy(), "features": name,
                                    "score": s, "target": y_te}))
        probes[name] = probe
    table = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    scores = pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(columns=list(SCORE_COLUMNS))
    return Results(table, scores, probes, missing_sets(sets), boot_skipped)


def write_results(results: Results, run) -> tuple[Path, Path]:
    """metrics/malignancy.csv and metrics/malignancy_scores.csv of `run`; returns both paths."""
    paths = config.malignancy_path(run), config.malignancy_scores_path(run)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    results.table.to_csv(paths[0], index=False)
    results.scores.to_csv(paths[1], index=False)
    return paths


# ============================================================================ the data chapter
def _named(frame: pd.DataFrame) -> pd.DataFrame:
    """Short-name attribute columns plus target, from either short names or release columns."""
    if "target" not in frame.columns:
        raise ValueError("attribute_differences: the frame has no target column")
    if all(n in frame.columns for n in attributes.NAMES):
        return frame[list(attributes.NAMES) + ["target"]]
    return attributes.named(frame, keep=("target",))


def attribute_differences(frame: pd.DataFrame) -> pd.DataFrame:
    """Per attribute: median of malignant minus median of benign lesions, in units of the
    attribute's interquartile range over all rows (robust to the long tails of the sizes).
    Missing values are left out of each attribute's medians and counted (n_missing)."""
    df = _named(frame)
    y = _labels(df["target"].to_numpy(), "attribute_differences")
    if y.min() == y.max():
        raise ValueError("attribute_differences: the frame holds only one class")
    rows = []
    for n in attributes.NAMES:
        v = df[n].to_numpy(dtype=np.float64)
        ok = ~np.isnan(v)
        q1, q3 = np.percentile(v[ok], [25, 75])
        mb, mm = np.median(v[ok & (y == 0)]), np.median(v[ok & (y == 1)])
        rows.append({"attribute": n, "median_benign": mb, "median_malignant": mm, "iqr": q3 - q1,
                     "difference": (mm - mb) / (q3 - q1) if q3 > q1 else np.nan,
                     "n_benign": int((ok & (y == 0)).sum()), "n_malignant": int((ok & (y == 1)).sum()),
                     "n_missing": int((~ok).sum())})
    return pd.DataFrame(rows)


def comparison_sentence(table: pd.DataFrame) -> str:
    """The results table in words: the measured attributes against the attributes the model
    reads (same probe), each vector set, and on how many test images, intervals included."""
    t = table.set_index("features")
    ci = lambda r, k: f"{r[k]:.3f} [{r[k + '_lo']:.3f}, {r[k + '_hi']:.3f}]"
    lines = []
    if {"true attributes", "predicted attributes (fit on true)"} <= set(t.index):
        a, b = t.loc["true attributes"], t.loc["predicted attributes (fit on true)"]
        lines.append(f"The measured attributes give pAUC {ci(a, 'pauc')}; the attributes the model reads give "
                     f"{ci(b, 'pauc')} with the same probe.")
    for name in EMBEDDING_SETS:
        if name in t.index:
            r = t.loc[name]
            lines.append(f"{name}: pAUC {ci(r, 'pauc')}, AUC {ci(r, 'auc')}.")
    if len(t):
        lines.append(f"All on {int(t.n_test.iloc[0])} test images with {int(t.n_malignant.iloc[0])} malignant "
                     "lesions; intervals that overlap do not separate two rows.")
    return " ".join(lines)
