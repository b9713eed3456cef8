"""Malignancy probes: choosing C by grouped cross-validation with a cold fit per (fold, C) vs one
warm-started path per fold (`skinlib.malignancy.choose_c`).

    .venv/bin/python bench/probes.py [--n 3500] [--dims 16 128]

Synthetic features of the embedded default's sizes (3,500 training images, 16 attributes or the
tiny model's 128-wide h_im), a label drawn from a logistic model at the phantom's 8% prevalence,
three lesions per patient. Both ways score the same folds and grid; the row says whether they pick
the same C and the largest difference of any cross-validated AUC.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from common import append, row, show, side_by_side
from skinlib import malignancy


def cold_choose_c(x, y, groups, grid=malignancy.C_GRID, folds=malignancy.FOLDS, seed=0):
    """What choose_c did before: a fresh pipeline (scaler + logistic regression) per fold and C."""
    from sklearn.model_selection import StratifiedGroupKFold

    splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, groups))
    aucs = np.array([[malignancy.roc_auc(y[va], malignancy._fit(x[tr], y[tr], c)[0].decision_function(x[va]))
                      for c in grid] for tr, va in splits])
    best = aucs.mean(0)
    return float(grid[int(np.flatnonzero(best >= best.max() - 1e-12)[0])]), best


def data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    w = rng.normal(size=d) / np.sqrt(d)
    z = (x - x.mean(0)) / x.std(0) @ w
    p = 1 / (1 + np.exp(-(1.5 * z - 3.2)))
    return x, (rng.random(n) < p).astype(int), np.arange(n) // 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3500)
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    rows = []
    for d in a.dims:
        x, y, g = data(a.n, d)
        cold_s, warm_s, cold, warm = side_by_side(lambda: cold_choose_c(x, y, g), lambda: malignancy.choose_c(x, y, g),
                                                  repeat=a.repeat)
        same = "same C" if cold[0] == warm[0] else f"C {cold[0]:g} vs {warm[0]:g}"
        diff = float(np.max(np.abs(cold[1] - warm[1]["cv_auc"].to_numpy())))
        rows.append(row("malignancy probe: choose C, cold fit per (fold, C) vs a warm-started path per fold",
                        f"{a.n} rows x {d} features, {y.mean():.1%} positive, {len(malignancy.C_GRID)} C x "
                        f"{malignancy.FOLDS} grouped folds; {same}, max |cv AUC difference| {diff:.1e}",
                        cold_s, warm_s))
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
