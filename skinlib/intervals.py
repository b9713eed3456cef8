"""How firm a headline number is: bootstrap intervals resampled by patient, and paired verdicts.

Lesions of one patient share skin, lighting and camera, so they are not independent draws: a
bootstrap that resamples lesions would claim more certainty than the data hold. Every interval here
resamples *patients* with replacement (all of a drawn patient's rows come along, as many times as
the patient is drawn), from one seeded set of draws shared by every attribute and method, so two
methods' medians are compared on the same resample (a paired comparison).

A resample is a vector of counts, one per patient; a row's weight is its patient's count. Weighted
statistics over those weights equal the statistic of the expanded multiset exactly (`weighted_median`
averages the two middle elements of an even count, as `numpy.median` does).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from . import attributes

LEVEL = 0.95
N_BOOT = 1000

# The paper's Fig. 4 ordering as paired comparisons: (name, method A, method B, kind).
# "less": A's median percentile is below B's (A retrieves closer values). "within": |A − B| ≤ margin.
COMPARISONS = (
    ("image_text<image", "image_text", "image", "less"),
    ("image<image_untuned", "image", "image_untuned", "less"),
    ("image<baseline_encoder", "image", "baseline_encoder", "less"),
    ("hierarchical~image_text", "hierarchical", "image_text", "within"),
)
COMPARISON_LABELS = {
    "image_text<image": "(a) image+text − (c) image", "image<image_untuned": "(c) image − (d) untuned",
    "image<baseline_encoder": "(c) image − (e) encoder", "hierarchical~image_text": "(b) hierarchical − (a)",
}
WITHIN = 2.0   # percentile points: "hierarchical is close to image+text"
VERDICTS = ("holds", "not separable", "reversed")
ORDERING_COLUMNS = ["attribute", "comparison", "difference", "lo", "hi", "verdict"]


def patient_draws(patients, n_boot: int = N_BOOT, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(codes, counts): `codes[i]` is row i's patient index; `counts[b, j]` how often patient j is
    drawn in resample b (each resample draws as many patients as there are, with replacement)."""
    codes, uniques = pd.factorize(pd.Series(patients), sort=True)
    if (codes < 0).any():
        raise ValueError(f"patient ids: {int((codes < 0).sum())} row(s) have no patient (NaN)")
    rng = np.random.default_rng(seed)
    n = len(uniques)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) if n else np.zeros((n_boot, 0), int)
    return codes, counts


def weighted_median(values, weights) -> np.ndarray:
    """Median of `values` (n,) repeated `weights` (B, n) times, for each of the B weight rows;
    NaN where a row's weights sum to 0."""
    v = np.asarray(values, float)
    w = np.atleast_2d(np.asarray(weights))
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[:, order]
    cum = np.cumsum(w, axis=1)
    total = cum[:, -1] if cum.shape[1] else np.zeros(len(w))
    # 1-based positions of the middle element(s) of the expanded multiset
    lo_pos, hi_pos = (total + 1) // 2, total // 2 + 1
    lo = (cum < lo_pos[:, None]).sum(1)   # index of the first element reaching that position
    hi = (cum < hi_pos[:, None]).sum(1)
    out = np.full(len(w), np.nan)
    ok = total > 0
    n = len(v)
    out[ok] = 0.5 * (v[np.minimum(lo[ok], n - 1)] + v[np.minimum(hi[ok], n - 1)])
    return out


def weighted_r2(y, p, weights) -> np.ndarray:
    """R² = 1 − SS_res/SS_tot of rows repeated `weights` (B, n) times, per weight row."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    w = np.atleast_2d(np.asarray(weights, float))
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (w * y).sum(1) / total
        ss_tot = (w * (y[None, :] - mean[:, None]) ** 2).sum(1)
        ss_res = (w * (y - p) ** 2).sum(1)
        return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


BLOCK = 20_000_000   # weight-matrix elements at a time: bounded memory at the paper's sizes


def _blocked(stat, counts: np.ndarray, codes: np.ndarray, *arrays) -> np.ndarray:
    """`stat(*arrays, weights)` for every resample, a block of resamples at a time (the weight
    matrix of all resamples at once would be 1000 x 590,000 cells at the paper's size)."""
    step = max(1, BLOCK // max(len(codes), 1))
    return np.concatenate([stat(*arrays, counts[b:b + step][:, codes]) for b in range(0, len(counts), step)])


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    d = draws[np.isfinite(draws)]
    if len(d) == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(d, [a, 1 - a])
    return float(lo), float(hi)


def _patients_of(ids, patient_of: Mapping, where: str) -> np.ndarray:
    s = pd.Series(ids).map(patient_of)
    if s.isna().any():
        raise KeyError(f"{where}: no patient for {int(s.isna().sum())} id(s), e.g. {pd.Series(ids)[s.isna()].iloc[0]!r}")
    return s.to_numpy()


def r2_intervals(pred: pd.DataFrame, patient_of: Mapping, n_boot: int = N_BOOT, seed: int = 0,
                 level: float = LEVEL) -> pd.DataFrame:
    """Per attribute (registry order), the R² of the parsed replies of a long prediction frame
    (isic_id, attribute, true, pred) with its patient-bootstrap interval: attribute, r2, r2_lo, r2_hi.
    Unparsed replies (pred NaN) are left out, as `metrics.r2_table` leaves them out."""
    ok = pred.pred.notna() & pred.true.notna()
    codes, counts = patient_draws(_patients_of(pred.isic_id, patient_of, "r2_intervals"), n_boot, seed)
    rows = []
    for name in attributes.NAMES:
        m = ((pred.attribute == name) & ok).to_numpy()
        if not (pred.attribute == name).any():
            continue
        y, p = pred.true.to_numpy(float)[m], pred.pred.to_numpy(float)[m]
        point = float(weighted_r2(y, p, np.ones((1, len(y))))[0]) if len(y) >= 2 else float("nan")
        lo, hi = _interval(_blocked(weighted_r2, counts, codes[m], y, p), level) if len(y) >= 2 else (np.nan, np.nan)
        rows.append({"attribute": name, "r2": point, "r2_lo": lo, "r2_hi": hi})
    return pd.DataFrame(rows, columns=["attribute", "r2", "r2_lo", "r2_hi"])


def _median_draws(long: pd.DataFrame, codes_of_query: dict, counts: np.ndarray) -> dict:
    """{(method, attribute): (point median, bootstrap medians (B,))} over the finite cells."""
    f = long[long.percentile.notna()]
    out = {}
    for (method, name), g in f.groupby(["method", "attribute"], sort=False, observed=True):
        c = g.query_id.map(codes_of_query).to_numpy()
        v = g.percentile.to_numpy(float)
        out[(str(method), str(name))] = (float(np.median(v)), _blocked(weighted_median, counts, c, v))
    return out


def _query_codes(long: pd.DataFrame, patient_of: Mapping, n_boot: int, seed: int):
    qids = pd.unique(long.query_id)
    codes, counts = patient_draws(_patients_of(qids, patient_of, "retrieval intervals"), n_boot, seed)
    return dict(zip(qids, codes)), counts


def median_intervals(long: pd.DataFrame, patient_of: Mapping, n_boot: int = N_BOOT, seed: int = 0,
                     level: float = LEVEL) -> pd.DataFrame:
    """Per method and attribute of a long percentile frame (query_id, attribute, percentile,
    method): the median percentile with its patient-bootstrap interval (columns method, attribute,
    median_percentile, lo, hi)."""
    codes, counts = _query_codes(long, patient_of, n_boot, seed)
    rows = [{"method": m, "attribute": a, "median_percentile": point, "lo": lo, "hi": hi}
            for (m, a), (point, draws) in _median_draws(long, codes, counts).items()
            for lo, hi in [_interval(draws, level)]]
    return pd.DataFrame(rows, columns=["method", "attribute", "median_percentile", "lo", "hi"])


def summary_with_intervals(summary: pd.DataFrame, long: pd.DataFrame, patient_of: Mapping,
                           n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> pd.DataFrame:
    """`percentiles.summary`'s table (metrics/retrieval.csv) with `median_lo`, `median_hi`: the
    patient-bootstrap interval of each method's median percentile per attribute."""
    ci = median_intervals(long, patient_of, n_boot, seed, level)
    ci = ci.rename(columns={"lo": "median_lo", "hi": "median_hi"}).drop(columns="median_percentile")
    out = summary.merge(ci, on=["method", "attribute"], how="left", validate="one_to_one")
    if len(out) != len(summary):
        raise ValueError("summary_with_intervals: the summary and the percentile frame disagree")
    return out


def verdict(kind: str, lo: float, hi: float, margin: float = WITHIN) -> str:
    """holds / not separable / reversed for a paired difference A − B with interval [lo, hi]."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not separable"
    if kind == "less":
        return "holds" if hi < 0 else "reversed" if lo > 0 else "not separable"
    if kind == "within":
        if -margin <= lo and hi <= margin:
            return "holds"
        return "reversed" if lo > margin or hi < -margin else "not separable"
    raise ValueError(f"comparison kind must be 'less' or 'within', not {kind!r}")


def ordering(long: pd.DataFrame, patient_of: Mapping, comparisons=COMPARISONS, n_boot: int = N_BOOT,
             seed: int = 0, level: float = LEVEL) -> pd.DataFrame:
    """The paper's ordering as paired comparisons per attribute: the difference of median
    percentiles A − B, its patient-bootstrap interval (both medians from the same resample) and a
    verdict. Columns: attribute, comparison, difference, lo, hi, verdict (metrics/ordering.csv).
    A comparison whose methods the frame lacks is left out."""
    codes, counts = _query_codes(long, patient_of, n_boot, seed)
    med = _median_draws(long, codes, counts)
    rows = []
    for name in attributes.NAMES:
        for comp, a, b, kind in comparisons:
            if (a, name) not in med or (b, name) not in med:
                continue
            (pa, da), (pb, db) = med[(a, name)], med[(b, name)]
            lo, hi = _interval(da - db, level)
            rows.append({"attribute": name, "comparison": comp, "difference": pa - pb, "lo": lo, "hi": hi,
                         "verdict": verdict(kind, lo, hi)})
    return pd.DataFrame(rows, columns=ORDERING_COLUMNS)


_SAY = {
    "image_text<image": "image+text retrieves closer values than image-only",
    "image<image_untuned": "image-only (fine-tuned) beats the untuned model",
    "image<baseline_encoder": "image-only (fine-tuned) beats the baseline encoder",
    "hierarchical~image_text": f"hierarchical is within {WITHIN:g} points of image+text",
}


def _which(names: list[str], most: int = 8) -> str:
    return ", ".join(names) if len(names) <= most else f"{len(names)} attributes"


def ordering_sentence(table: pd.DataFrame, level: float = LEVEL) -> str:
    """The ordering table in words: per comparison, on how many attributes it holds beyond the
    bootstrap noise, and where it is not separable or reversed (named when few)."""
    if table.empty:
        return "No comparison could be made (the methods are missing)."
    parts = []
    for comp, g in table.groupby("comparison", sort=False):
        by = {v: g.attribute[g.verdict == v].tolist() for v in VERDICTS}
        text = f"{_SAY.get(comp, comp)} on {len(by['holds'])} of {len(g)} attributes"
        extra = []
        if by["not separable"]:
            extra.append(f"not separable from noise on {_which(by['not separable'])}")
        if by["reversed"]:
            extra.append(f"reversed beyond noise on {_which(by['reversed'])}")
        parts.append(text + (f" ({'; '.join(extra)})" if extra else ""))
    return f"with {level:.0%} patient-bootstrap intervals, " + "; ".join(parts) + "."


def seed_agreement_sentence(wide: pd.DataFrame) -> str:
    """probes/seed_study.py's table in words: per comparison, on how many attributes the verdicts
    of every seed agree, and where they do not (with each seed's verdict)."""
    seeds = [c[len("verdict_"):] for c in wide.columns if c.startswith("verdict_")]
    parts = []
    for comp, g in wide.groupby("comparison", sort=False):
        differ = g[~g.agree.astype(bool)]
        text = f"{_SAY.get(comp, comp)}: the verdicts agree on {int(g.agree.sum())} of {len(g)} attributes"
        if len(differ):
            text += " (not on " + "; ".join(
                f"{r.attribute}: " + " vs ".join(str(r[f"verdict_{s}"]) for s in seeds)
                for _, r in differ.iterrows()) + ")"
        parts.append(text)
    return f"Across training seeds ({', '.join(seeds)}): " + "; ".join(parts) + "."
