"""Figures of the malignancy chapter: ROC curves with the challenge's pAUC region, probe coefficients."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import attributes, malignancy
from .figures import PAGE_WIDTH


def _check_scores(scores: pd.DataFrame) -> None:
    missing = [c for c in malignancy.SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"scores: missing column(s) {', '.join(missing)}")
    if scores.empty:
        raise ValueError("scores: no rows")


def roc_curves(scores: pd.DataFrame, min_tpr: float = malignancy.MIN_TPR, table: pd.DataFrame | None = None):
    """One ROC curve per feature set (a `malignancy_scores.csv` frame). Left: the whole curve, the
    band TPR >= min_tpr shaded. Right: that band enlarged, the area between each curve and
    TPR = min_tpr filled: the challenge's partial AUC. `table` (malignancy.csv) adds the
    intervals to the legend. Returns the figure."""
    from sklearn.metrics import roc_curve

    _check_scores(scores)
    rows = table.set_index("features") if table is not None else None
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.9))
    ax.axhspan(min_tpr, 1, color="0.9", zorder=0)
    for ax_ in (ax, zoom):
        ax_.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
    for k, (name, part) in enumerate(scores.groupby("features", sort=False)):
        fpr, tpr, _ = roc_curve(part["target"], part["score"])
        auc = malignancy.roc_auc(part["target"], part["score"])
        pauc = malignancy.partial_auc(part["target"], part["score"], min_tpr)
        label = f"{name}: AUC {auc:.2f}, pAUC {pauc:.3f}"
        if rows is not None and name in rows.index:
            r = rows.loc[name]
            label += f" [{r.pauc_lo:.3f}, {r.pauc_hi:.3f}]"
        color = f"C{k}"
        ax.plot(fpr, tpr, color=color, lw=1.4, label=label)
        zoom.plot(fpr, tpr, color=color, lw=1.4)
        zoom.fill_between(fpr, min_tpr, np.maximum(tpr, min_tpr), color=color, alpha=0.12, step=None)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"ROC (shaded: TPR ≥ {min_tpr:.0%}, the challenge's region)", fontsize=9)
    zoom.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1),
             ylim=(min_tpr, 1.005))
    zoom.set_title(f"pAUC = area above TPR {min_tpr:.0%} (max {1 - min_tpr:.1f})", fontsize=9)
    # below both panels (inside, it would cover the curves): the panels are laid out first,
    # above the room it takes
    rows = -(-len(ax.get_legend_handles_labels()[1]) // 2)
    fig.tight_layout(rect=(0, (0.16 * rows + 0.05) / fig.get_figheight(), 1, 1))
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 0), ncol=2, frameon=False,
              bbox_transform=fig.transFigure)
    return fig


def coefficients(coefs: pd.DataFrame, title: str = "what the prediction leans on", ax=None):
    """Horizontal bars of a probe's standardised coefficients (`malignancy.coefficients`): change
    in log-odds per training SD of each feature, largest at the top. Returns the figure."""
    if not {"feature", "coef"} <= set(coefs.columns):
        raise ValueError("coefficients: need columns feature, coef")
    c = coefs.iloc[::-1]
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 0.28 * len(c) + 1.0))
    else:
        fig = ax.figure
    ax.barh(c["feature"], c["coef"], color=np.where(c["coef"] > 0, "C3", "C0"))
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set(xlabel="log-odds per SD (red: towards malignant)", title=title)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return fig


def contributions(row: pd.Series, names, title: str | None = None, ax=None):
    """One lesion's contributions (a row of `malignancy.contributions`): standardised value ×
    coefficient per feature, for the explorer. Returns the figure."""
    names = list(names)
    missing = [n for n in names + ["score"] if n not in row.index]
    if missing:
        raise ValueError(f"contributions: row lacks {', '.join(missing)}")
    v = row[names].astype(float)
    v = v.reindex(v.abs().sort_values().index)
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 0.28 * len(v) + 1.0))
    else:
        fig = ax.figure
    ax.barh(v.index, v.to_numpy(), color=np.where(v.to_numpy() > 0, "C3", "C0"))
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set(xlabel="contribution to the log-odds", title=title or f"{row.get('isic_id', '')}: log-odds {row['score']:.2f}")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return fig


def attribute_differences(frames: dict[str, pd.DataFrame], names=None):
    """Malignant minus benign median per attribute, in IQR units (`malignancy.attribute_differences`
    of each labelled frame), one bar per frame: does the phantom's label lean on the attributes as
    the real release's does?"""
    names = list(names or attributes.NAMES)
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(names) + 1.2))
    h = 0.8 / len(frames)
    for j, (label, table) in enumerate(frames.items()):
        d = table.set_index("attribute").reindex(names).difference.to_numpy(float)
        ax.barh(np.arange(len(names)) + (j - (len(frames) - 1) / 2) * h, d, height=h, color=f"C{j}", label=label)
    ax.axvline(0, color="0.3", lw=0.7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median malignant − median benign (in IQRs of the attribute)", fontsize=8)
    ax.legend(frameon=False, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(frames))
    fig.tight_layout()
    return fig
