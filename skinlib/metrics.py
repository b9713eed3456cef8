"""Comparisons between attribute distributions and between predictions and truth."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from . import attributes


def ks_by_attribute(a: pd.DataFrame, b: pd.DataFrame, names=None) -> pd.DataFrame:
    """Two-sample Kolmogorov-Smirnov statistic per attribute between two frames keyed by short
    names (NaNs ignored): columns attribute, ks, pvalue, n_a, n_b."""
    rows = []
    for att in attributes.resolve(names):
        x = a[att.name].to_numpy(float)
        y = b[att.name].to_numpy(float)
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
        if len(x) == 0 or len(y) == 0:
            raise ValueError(f"attribute {att.name!r}: no finite values to compare ({len(x)} vs {len(y)})")
        r = stats.ks_2samp(x, y)
        rows.append((att.name, float(r.statistic), float(r.pvalue), len(x), len(y)))
    return pd.DataFrame(rows, columns=["attribute", "ks", "pvalue", "n_a", "n_b"])


def r2_score(y_true, y_pred) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (NaN if fewer than 2 values or no spread)."""
    y, p = np.asarray(y_true, float), np.asarray(y_pred, float)
    if y.shape != p.shape:
        raise ValueError(f"r2_score: shapes differ, {y.shape} vs {p.shape}")
    if len(y) < 2:
        return float("nan")
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0:
        return float("nan")
    return 1.0 - float(((y - p) ** 2).sum()) / ss_tot


def r2_table(pred: pd.DataFrame) -> pd.DataFrame:
    """Per attribute (registry order) from a long frame with columns attribute, true, pred
    (pred NaN = the reply held no number): r2 and mae over the parsed replies, n = replies
    scored, unparsed = replies without a number (reported, not scored).

    Columns: attribute, r2, mae, n, unparsed — the layout of runs/<profile>/metrics/r2.csv.
    """
    missing = {"attribute", "true", "pred"} - set(pred.columns)
    if missing:
        raise KeyError(f"r2_table: prediction frame lacks column(s) {sorted(missing)}")
    unknown = set(pred.attribute) - set(attributes.NAMES)
    if unknown:
        raise KeyError(f"r2_table: unknown attribute(s) {sorted(unknown)}")
    rows = []
    for name in attributes.NAMES:
        g = pred[pred.attribute == name]
        if g.empty:
            continue
        ok = g.pred.notna() & g.true.notna()
        y, p = g.true[ok].to_numpy(float), g.pred[ok].to_numpy(float)
        rows.append({"attribute": name, "r2": r2_score(y, p),
                     "mae": float(np.abs(y - p).mean()) if len(y) else float("nan"),
                     "n": int(ok.sum()), "unparsed": int(g.pred.isna().sum())})
    return pd.DataFrame(rows, columns=["attribute", "r2", "mae", "n", "unparsed"])


def worst_cases(pred: pd.DataFrame, names, per_attribute: int = 4) -> pd.DataFrame:
    """For each attribute in `names`, the `per_attribute` rows of a prediction frame whose reply is
    furthest from the truth; a reply without a number counts as the worst of all."""
    rows = []
    for name in names:
        g = pred[pred.attribute == name]
        err = (g.pred - g.true).abs().fillna(float("inf"))
        rows.append(g.assign(abs_error=err).nlargest(per_attribute, "abs_error"))
    return pd.concat(rows, ignore_index=True) if rows else pred.head(0).assign(abs_error=[])
