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
