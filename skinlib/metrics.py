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


def _check_predictions(pred: pd.DataFrame, who: str) -> None:
    """A long prediction frame has columns attribute, true, pred and names registry attributes only."""
    missing = {"attribute", "true", "pred"} - set(pred.columns)
    if missing:
        raise KeyError(f"{who}: prediction frame lacks column(s) {sorted(missing)}")
    unknown = set(pred.attribute) - set(attributes.NAMES)
    if unknown:
        raise KeyError(f"{who}: unknown attribute(s) {sorted(unknown)}")


def r2_table(pred: pd.DataFrame) -> pd.DataFrame:
    """Per attribute (registry order) from a long frame with columns attribute, true, pred
    (pred NaN = the reply held no number): r2 and mae over the parsed replies, n = replies
    scored, unparsed = replies without a number (reported, not scored).

    Columns: attribute, r2, mae, n, unparsed — the layout of runs/<profile>/metrics/r2.csv.
    """
    _check_predictions(pred, "r2_table")
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


def ridge_readout_r2(x_train, y_train, x_test, y_test, lam: float = 1e-2,
                     chunk: int = 8192) -> tuple[float, int, int]:
    """Test R² of a ridge regression from vectors to one attribute: how much of the attribute a
    *linear* read-out of the vectors holds. Features are standardised on the training vectors; the
    penalty is lam x (training rows) on the standardised weights, the intercept unpenalised. Rows
    whose value is NaN (not measured) are left out of the fit and the score, and counted: returns
    (r2, training rows used, test rows scored).

    The vectors are read `chunk` rows at a time into float64 (means, spreads, the d x d normal
    equations, the predictions): no float64 copy of the whole input, which at the paper's
    database (282,564 x 3,584) would be 8 GB per copy."""
    xtr, xte = np.asarray(x_train), np.asarray(x_test)
    ytr, yte = np.asarray(y_train, np.float64), np.asarray(y_test, np.float64)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"ridge_readout_r2: vectors must be (n, d) with one d, got {xtr.shape} and {xte.shape}")
    if len(ytr) != len(xtr) or len(yte) != len(xte):
        raise ValueError(f"ridge_readout_r2: {len(xtr)} / {len(xte)} vectors but {len(ytr)} / {len(yte)} values")
    ok, okt = np.flatnonzero(np.isfinite(ytr)), np.flatnonzero(np.isfinite(yte))
    blocks = lambda x, rows: (x[rows[s:s + chunk]].astype(np.float64) for s in range(0, len(rows), chunk))
    d, n = xtr.shape[1], len(ok)
    mu = sum(b.sum(0) for b in blocks(xtr, ok)) / n
    ym = ytr[ok].mean()
    gram, rhs = np.zeros((d, d)), np.zeros(d)   # of the centred vectors
    for s, b in zip(range(0, n, chunk), blocks(xtr, ok)):
        b -= mu
        gram += b.T @ b
        rhs += b.T @ (ytr[ok[s:s + chunk]] - ym)
    sd = np.sqrt(np.diag(gram) / n)             # the spreads are the scatter's diagonal
    sd = np.where(sd > 0, sd, 1.0)
    w = np.linalg.solve(gram / np.outer(sd, sd) + lam * n * np.eye(d), rhs / sd)
    pred = np.concatenate([((b - mu) / sd) @ w + ym for b in blocks(xte, okt)]) if len(okt) else np.empty(0)
    return r2_score(yte[okt], pred), int(n), int(len(okt))


def readout_table(db_vectors: dict, db_values: pd.DataFrame, query_vectors: dict, query_values: pd.DataFrame,
                  names=None, lam: float = 1e-2, fit_rows: dict | None = None) -> pd.DataFrame:
    """Per attribute and kind of vector, the test R² of a ridge read-out fitted on the database
    (training images) and scored on the queries (test images). A kind's array is (n, d), one vector
    per image (h_im), or (n, 16, d), one per attribute in registry order (h_im,a: attribute a reads
    its own question's vector). Value frames hold the attribute short names, one row per vector.
    `fit_rows` ({attribute: boolean array over the database rows}) fits an attribute on those rows
    only, e.g. the training images whose tuples asked it. Columns: attribute, kind, r2, n_train, n_test."""
    atts = attributes.resolve(names)
    if set(db_vectors) != set(query_vectors):
        raise KeyError(f"readout_table: database kinds {sorted(db_vectors)} differ from query kinds {sorted(query_vectors)}")
    if fit_rows is not None:
        unknown = set(fit_rows) - {a.name for a in atts}
        missing = {a.name for a in atts} - set(fit_rows)
        if unknown or missing:
            raise KeyError(f"readout_table: fit_rows has unknown attribute(s) {sorted(unknown)} and lacks {sorted(missing)}")
        bad = [k for k, v in fit_rows.items() if np.asarray(v).dtype != bool or len(v) != len(db_values)]
        if bad:
            raise ValueError(f"readout_table: fit_rows must be boolean arrays of {len(db_values)} database rows; "
                             f"not so for {sorted(bad)}")
    rows = []
    for kind, xd in db_vectors.items():
        xq = query_vectors[kind]
        if len(xd) != len(db_values) or len(xq) != len(query_values):
            raise ValueError(f"readout_table: {kind!r} has {len(xd)} / {len(xq)} vectors for "
                             f"{len(db_values)} / {len(query_values)} rows of values")
        for att in atts:
            if att.name not in db_values or att.name not in query_values:
                raise KeyError(f"readout_table: value frames lack attribute {att.name!r}")
            if xd.ndim == 3:
                j = attributes.NAMES.index(att.name)
                a, b = xd[:, j], xq[:, j]
            else:
                a, b = xd, xq
            y = db_values[att.name].to_numpy()
            if fit_rows is not None:
                keep = np.asarray(fit_rows[att.name])
                a, y = a[keep], y[keep]
            r2, ntr, nte = ridge_readout_r2(a, y, b, query_values[att.name], lam=lam)
            rows.append({"attribute": att.name, "kind": kind, "r2": r2, "n_train": ntr, "n_test": nte})
    return pd.DataFrame(rows, columns=["attribute", "kind", "r2", "n_train", "n_test"])


def r2_parts(y_true, y_pred) -> dict:
    """R² split into what the predictions track and what they lose (Murphy's decomposition of the
    mean squared error, population moments):

        R² = ρ² − (ρ − σ_pred/σ_true)² − ((μ_pred − μ_true)/σ_true)²
             tracked    lost to scale        lost to offset

    ρ² (`tracked`) is the most any rescaling of the predictions could reach; `scale` is what a
    spread too narrow or too wide for that correlation costs; `offset` what a shifted mean costs.
    Constant predictions have ρ = 0 (and no scale loss). Returns r2, tracked, scale, offset, corr;
    NaN for all when fewer than 2 values or the truth has no spread."""
    y, p = np.asarray(y_true, float), np.asarray(y_pred, float)
    if y.shape != p.shape:
        raise ValueError(f"r2_parts: shapes differ, {y.shape} vs {p.shape}")
    nan = dict.fromkeys(["r2", "tracked", "scale", "offset", "corr"], float("nan"))
    if len(y) < 2 or y.std() == 0:
        return nan
    sy = y.std()
    sp = p.std() if np.ptp(p) > 0 else 0.0   # a constant's float std can come out as 1e-16
    rho = float(((y - y.mean()) * (p - p.mean())).mean() / (sy * sp)) if sp > 0 else 0.0
    scale = (rho - sp / sy) ** 2
    offset = ((p.mean() - y.mean()) / sy) ** 2
    return {"r2": rho ** 2 - scale - offset, "tracked": rho ** 2, "scale": float(scale),
            "offset": float(offset), "corr": rho}


def r2_parts_table(pred: pd.DataFrame) -> pd.DataFrame:
    """r2_parts per attribute (registry order) over the parsed replies of a long prediction frame
    (columns attribute, true, pred): columns attribute, r2, tracked, scale, offset, corr, n."""
    _check_predictions(pred, "r2_parts_table")
    rows = []
    for name in attributes.NAMES:
        g = pred[(pred.attribute == name) & pred.pred.notna() & pred.true.notna()]
        if len(g):
            rows.append({"attribute": name, **r2_parts(g.true, g.pred), "n": len(g)})
    return pd.DataFrame(rows, columns=["attribute", "r2", "tracked", "scale", "offset", "corr", "n"])


def r2_sentence(r2: pd.DataFrame, n_images: int, profile: str, reading: str, unparsed: float) -> str:
    """"This run" for Fig. 2, from an r2.csv-like table (attribute, r2, and r2_lo/r2_hi where the
    intervals were computed): range, median, how many attributes reach 0.70 and how many of those
    do so beyond noise (the interval's lower end), how many sit below zero beyond noise, and the
    share of replies that were not a number."""
    scored = r2.dropna(subset=["r2"])
    head = f"**This run** ({profile} profile, {n_images:,} test images, {reading} reading): "
    if scored.empty:
        return head + "no attribute could be scored: no reply was a number."
    lo, hi = scored.loc[scored.r2.idxmin()], scored.loc[scored.r2.idxmax()]
    text = (f"R² between {lo.r2:.2f} ({lo.attribute}) and {hi.r2:.2f} ({hi.attribute}), median "
            f"{scored.r2.median():.2f}; {int((scored.r2 >= 0.70).sum())} of {len(r2)} attributes reach 0.70")
    if {"r2_lo", "r2_hi"} <= set(scored.columns):
        firm = int((scored.r2_lo >= 0.70).sum())
        below = scored.attribute[scored.r2_hi < 0].tolist()
        text += (f" ({firm} with the whole 95% interval above it); "
                 + (f"below zero beyond noise: {', '.join(below)}" if below else "none is below zero beyond noise"))
    return head + text + f"; {unparsed:.2%} of the replies were not a number."


def r2_parts_sentence(parts: pd.DataFrame, pred: pd.DataFrame, train_values: pd.DataFrame) -> str:
    """What `r2_parts_table` says, in words: how many attributes lose little to spread and mean,
    and for those below zero, whether an offset of a typical (not average) answer explains it."""
    p = parts.set_index("attribute")
    calibrated = p.index[(p.scale + p.offset) < 0.05]
    lines = [f"For {len(calibrated)} of {len(p)} attributes the replies lose less than 0.05 to spread and "
             "mean together: there the R² is what the replies track, and raising it takes a model that "
             "sees (or says) more, not a recalibration of its replies."]
    below = p[p.r2 < 0]
    if len(below):
        means = pred.dropna(subset=["pred", "true"]).groupby("attribute")[["pred", "true"]].mean()
        lines.append("Below zero: " + "; ".join(
            f"**{a}** (ρ² {r.tracked:.2f}, offset {r.offset:.2f}: replies' mean {means.pred[a]:.2f}, "
            f"measured mean {means.true[a]:.2f}, training median {train_values[a].median():.2f})"
            for a, r in below.iterrows()) + ".")
        # offset-driven: right-skewed in training, replies below the measured mean, R² >= 0 without the offset
        skewed = [a for a, r in below.iterrows() if train_values[a].mean() > train_values[a].median()
                  and means.pred[a] < means.true[a] and r.tracked - r.scale >= 0]
        if skewed:
            lines.append(f"Where replies barely follow an attribute, they give a typical answer rather than "
                         f"the average one. {', '.join(skewed)} {'are' if len(skewed) > 1 else 'is'} "
                         "right-skewed in training (mean above median), so the typical answer lies below the "
                         "mean, and that offset alone takes the R² below zero.")
    return "\n\n".join(lines)


def medians_sentence(table: pd.DataFrame, where: str) -> str:
    """Per reading of a table (attribute, r2, reading), the median R² over the attributes and how
    many reach 0.70, in one sentence that starts with `where`."""
    parts = []
    for name, g in table.groupby("reading", sort=False):
        r = g.r2.dropna()
        parts.append(f"{name}: R² median {r.median():.2f}, {int((r >= 0.70).sum())} of {len(g)} attributes at 0.70 or more")
    return f"{where}: " + "; ".join(parts) + "."


# ---- R² against the number of training images (probes/scale_study.py) -------------------------
PAPER_TRAIN_IMAGES = 282_564  # the paper's training split (skinlib/split.py)


def scale_hardest(table: pd.DataFrame, model: str, k: int = 3) -> list[str]:
    """The k attributes `model` reads worst at its largest training size in a scale table
    (n_train, model, attribute, r2, ...)."""
    g = table[table.model == model]
    if g.empty:
        raise KeyError(f"scale table: no rows for model {model!r}; models: {sorted(set(table.model))}")
    last = g[g.n_train == g.n_train.max()].dropna(subset=["r2"])
    return last.nsmallest(k, "r2").attribute.tolist()


def scale_sentence(table: pd.DataFrame, labels: dict | None = None, hardest=None,
                   paper_n: int = PAPER_TRAIN_IMAGES) -> str:
    """A scale table (n_train, model, attribute, r2, r2_lo, r2_hi) in words, per model: the
    median R² over the attributes at each size and its change per tenfold of training images
    (a least-squares line on log10 n_train), whether the `hardest` attributes moved beyond their
    95% intervals between the smallest and the largest size, and, cautiously, what that line
    carried on would give at the paper's `paper_n`, or at what size it would reach R² = 1 if that
    comes first (a direction, not a forecast)."""
    labels = labels or {}
    need = {"n_train", "model", "attribute", "r2", "r2_lo", "r2_hi"}
    if need - set(table.columns):
        raise KeyError(f"scale table lacks columns {sorted(need - set(table.columns))}")
    parts, ahead = [], []
    for model, g in table.groupby("model", sort=False):
        name = labels.get(model, model)
        med = g.groupby("n_train").r2.median()
        steps = " → ".join(f"{m:.2f} at {n:,}" for n, m in med.items())
        if len(med) < 2:
            parts.append(f"{name}: R² median {steps} training images (one size: no trend yet)")
            continue
        slope = float(np.polyfit(np.log10(med.index.to_numpy(float)), med.to_numpy(), 1)[0])
        text = f"{name}: R² median {steps} training images ({slope:+.2f} per tenfold)"
        first, last = (g[g.n_train == n].set_index("attribute") for n in (med.index[0], med.index[-1]))
        moves = []
        for a in (hardest or []):
            if a not in first.index or a not in last.index:
                continue
            f, t = first.loc[a], last.loc[a]
            how = ("up beyond its intervals" if t.r2_lo > f.r2_hi else
                   "down beyond its intervals" if t.r2_hi < f.r2_lo else "within its intervals")
            moves.append(f"{a} {f.r2:.2f} → {t.r2:.2f}, {how}")
        if moves:
            text += "; " + "; ".join(moves)
        parts.append(text)
        ahead.append((name, slope, float(med.iloc[-1]), int(med.index[-1]), len(med)))
    out = ". ".join(parts) + "."
    if not ahead:
        return out + (f" With one size there is no trend to carry towards the paper's "
                      f"{paper_n:,} training images.")
    said = []
    for name, slope, m, n, _ in ahead:
        at_paper = m + slope * np.log10(paper_n / n)
        if slope <= 0:
            said.append(f"for {name}, no rise to carry on")
        elif at_paper >= 1:
            one = n * 10 ** ((1 - m) / slope)
            said.append(f"for {name}, R² = 1 at about {float(f'{one:.2g}'):,.0f} training images")
        else:
            said.append(f"for {name}, {at_paper:.2f} at the paper's size")
    top, n_sizes = max(a[3] for a in ahead), min(a[4] for a in ahead)
    return out + (
        f" The paper trained on {paper_n:,} images, {np.log10(paper_n / top):.1f} decades "
        "beyond the largest size here. Carried on as a straight line on the log axis, the median "
        "would reach: " + "; ".join(said) + ". R² cannot pass 1, so where a line reaches it before the paper's "
        f"size the gain must slow down first: a direction drawn from {n_sizes} sizes, not a "
        "forecast, and nothing measured here says where the curves flatten.")
