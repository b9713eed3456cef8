"""Every figure of the book: image grids, distributions, R², embeddings, retrieval, benchmarks.

Figures are drawn at the width of the book's text column (PAGE_WIDTH at the notebooks' 100 dpi),
so the page shows them near their own size and their labels stay readable.
"""
from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import attributes

PAGE_WIDTH = 8.0  # inches: the book's text column is about 800 px wide


def image_grid(images, captions=None, ncols: int = 4, size: float | None = None,
               title: str | None = None):
    """Images (PIL or arrays) in a grid, each with an optional caption; returns the figure.
    Each image is `size` inches wide (default: the grid fills the page width), its caption
    above it in 9 pt, or 8 pt where the images are narrower than 1.8 in."""
    images = list(images)
    if not images:
        raise ValueError("image_grid: no images")
    captions = list(captions) if captions is not None else [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"image_grid: {len(images)} images but {len(captions)} captions")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    size = size or PAGE_WIDTH / ncols
    fontsize = 9 if size >= 1.8 else 8
    lines = max((c.count("\n") + 1 for c in captions if c), default=0)
    row = size + lines * fontsize / 60 + 0.1   # the image, its caption lines, a gap
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, row * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, cap in zip(axes.flat, images, captions):
        ax.imshow(np.asarray(im))
        ax.set_title(cap, fontsize=fontsize)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def attribute_distributions(frames: dict[str, pd.DataFrame], names=None,
                            ks: pd.DataFrame | None = None, ncols: int = 4):
    """One panel per attribute, a density per labelled frame (frames keyed by short names).
    Heavy-tailed size attributes are drawn on a log axis. `ks` (from metrics.ks_by_attribute)
    adds the statistic to each title."""
    atts = attributes.resolve(names)
    long = pd.concat([f[[a.name for a in atts]].assign(source=label) for label, f in frames.items()],
                     ignore_index=True)
    nrows = math.ceil(len(atts) / ncols)
    w = PAGE_WIDTH / ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, 0.8 * w * nrows), squeeze=False)
    ksd = dict(zip(ks["attribute"], ks["ks"])) if ks is not None else {}
    for ax in axes.flat[len(atts):]:
        ax.axis("off")
    for i, (ax, att) in enumerate(zip(axes.flat, atts)):
        log = att.name in ("areaMM2", "perimeterMM", "minorAxisMM", "clin_size_long_diam_mm")
        sns.histplot(long, x=att.name, hue="source", stat="density", common_norm=False,
                     element="step", fill=False, bins=40, log_scale=log, ax=ax, legend=False)
        t = att.name + (f"  (KS {ksd[att.name]:.2f})" if att.name in ksd else "")
        ax.set_title(t, fontsize=8)
        ax.set_xlabel(att.unit, fontsize=7)
        ax.set_ylabel("")
        ax.tick_params(labelsize=6)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())   # log axes: decades only
    # one legend for every panel, above them (seaborn's colours follow the frames' order)
    colors = sns.color_palette(n_colors=len(frames))
    handles = [plt.Line2D([], [], color=c) for c in colors]
    fig.legend(handles, list(frames), loc="upper center", ncol=len(frames), frameon=False,
               fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (0.8 * w * nrows)))
    return fig


def _smooth(s: pd.Series, window: int) -> pd.Series:
    return s.rolling(window, min_periods=1).mean()


def training_curves(hist: pd.DataFrame, window: int = 50):
    """Loss (raw and smoothed), learning rate and throughput against the optimizer step."""
    fig, axes = plt.subplots(1, 3, figsize=(PAGE_WIDTH, 2.8))
    ax = axes[0]
    ax.plot(hist.step, hist.loss, color="0.8", lw=0.6, label="per step")
    ax.plot(hist.step, _smooth(hist.loss, window), color="C0", label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss (answer tokens)", yscale="log", title="loss")
    ax.legend(frameon=False, fontsize=8)
    axes[1].plot(hist.step, hist.lr, color="C1")
    axes[1].set(xlabel="step", ylabel="learning rate", title="cosine schedule")
    axes[2].plot(hist.step, hist.tuples_per_s, color="C2")
    axes[2].set(xlabel="step", ylabel="tuples / s (running mean)", title="throughput",
                ylim=(0, None))
    fig.tight_layout()
    return fig


def method_comparison(curves: pd.DataFrame, window: int = 10):
    """Smoothed loss per step for each fine-tuning method (frame with step, loss, method)."""
    fig, ax = plt.subplots(figsize=(0.7 * PAGE_WIDTH, 3.4))
    for i, (m, g) in enumerate(curves.groupby("method", sort=False)):
        ax.plot(g.step, _smooth(g.loss, window), color=f"C{i}", label=m)
    ax.set(xlabel="step", ylabel="loss (answer tokens)", title="random-init tiny model: full vs LoRA")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def _label_cut(ax, x, values, floor: float) -> None:
    """Write the value on each bar cut at `floor`."""
    for xi, vi in zip(x, values):
        if np.isfinite(vi) and vi < floor:
            ax.text(xi, floor + 0.01, f"{vi:.1f}", ha="center", va="bottom", fontsize=6, rotation=90, zorder=4)


def _r2_axes(ax, order, floor: float, ncols: int) -> None:
    """Axes of a per-attribute R² chart: the zero line, attribute ticks, the legend on top."""
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set(ylim=(floor, 1.05), xlim=(-0.6, len(order) - 0.4), ylabel="R² (test images)")
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=8)
    ax.legend(frameon=False, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=ncols)


def readout_vs_answers(table: pd.DataFrame, labels: dict | None = None, floor: float = -0.2):
    """Grouped bars per attribute (registry order): R² of each `kind` in a long frame with columns
    attribute, kind, r2 (e.g. the greedy answers and ridge read-outs of the model's vectors).
    Values below `floor` are cut there and labelled."""
    labels = labels or {}
    kinds = list(dict.fromkeys(table.kind))
    order = [n for n in attributes.NAMES if n in set(table.attribute)]
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.4))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        v = table[table.kind == kind].set_index("attribute").r2.reindex(order)
        x = np.arange(len(order)) + (k - (len(kinds) - 1) / 2) * width
        ax.bar(x, v.clip(lower=floor).fillna(floor), width, color=f"C{k}", label=labels.get(kind, kind), zorder=2)
        _label_cut(ax, x, v, floor)
    _r2_axes(ax, order, floor, ncols=len(kinds))
    fig.tight_layout()
    return fig


def r2_parts(parts: pd.DataFrame, floor: float = -0.5):
    """Per attribute (registry order), the R² of the answers with what they lose (a frame of
    metrics.r2_parts_table): a stack from the R² (blue, drawn from 0 when positive) through the
    loss to an offset mean (red) and to a wrong spread (orange) up to ρ², the R² the answers would
    reach rescaled. A black tick marks the R²; stacks below `floor` are cut there and labelled."""
    order = [n for n in attributes.NAMES if n in set(parts.attribute)]
    t = parts.set_index("attribute").reindex(order)
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.4))
    r2 = t.r2.to_numpy(float)
    lo = np.maximum(r2, floor)
    ax.bar(x, np.maximum(r2, 0), color="C0", zorder=2, label="R² of the answers")
    off_top = np.maximum(r2 + t.offset.to_numpy(float), floor)
    ax.bar(x, off_top - lo, bottom=lo, color="C3", zorder=2, label="lost to an offset mean")
    ax.bar(x, np.maximum(t.tracked.to_numpy(float), floor) - off_top, bottom=off_top, color="C1", zorder=2,
           label="lost to a wrong spread")
    ax.scatter(x, lo, marker="_", s=160, color="k", zorder=3)
    _label_cut(ax, x, r2, floor)
    _r2_axes(ax, order, floor, ncols=3)
    fig.tight_layout()
    return fig


def predicted_vs_true(pred: pd.DataFrame, r2: pd.DataFrame | None = None, ncols: int = 4, q: float = 0.005):
    """One scatter per attribute of reply against measured value, axes set to the measured values'
    central range; replies outside it are drawn on the edge as triangles."""
    names = [n for n in attributes.NAMES if n in set(pred.attribute)]
    nrows = math.ceil(len(names) / ncols)
    w = PAGE_WIDTH / ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, 0.95 * w * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    score = dict(zip(r2.attribute, r2.r2)) if r2 is not None else {}
    for ax, name in zip(axes.flat, names):
        g = pred[(pred.attribute == name) & pred.pred.notna()]
        lo, hi = np.nanquantile(pred.loc[pred.attribute == name, "true"], [q, 1 - q])
        pad = 0.05 * ((hi - lo) or 1.0)
        lo, hi = lo - pad, hi + pad
        y = g.pred.clip(lo, hi)
        out = (g.pred < lo) | (g.pred > hi)
        ax.scatter(g.true[~out], y[~out], s=4, alpha=0.4, color="C0", lw=0)
        ax.scatter(g.true[out], y[out], s=14, marker="^", color="C3", lw=0)
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.7)
        ax.set(xlim=(lo, hi), ylim=(lo, hi))
        unit = attributes.get(name).unit
        ax.set_title(f"{name}" + (f" ({unit})" if unit else "") +
                     (f"\nR² {score[name]:.2f}" if name in score else ""), fontsize=8)
        ax.tick_params(labelsize=7)
    fig.supxlabel("measured")
    fig.supylabel("model's reply")
    fig.tight_layout()
    return fig


def embedding_map(xy: np.ndarray, values: pd.DataFrame, names, ncols: int = 4):
    """2-D projection of embeddings, one panel per attribute, points coloured by its value
    (colour scale clipped to the 2nd-98th percentile so a few extremes do not flatten it)."""
    names = list(names)
    ncols = min(ncols, len(names))
    nrows = math.ceil(len(names) / ncols)
    w = PAGE_WIDTH / ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, 0.9 * w * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        v = values[name].to_numpy(float)
        lo, hi = np.nanpercentile(v, [2, 98])
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=3, cmap="viridis", vmin=lo, vmax=hi, lw=0)
        fig.colorbar(sc, ax=ax, shrink=0.8)
        unit = attributes.get(name).unit
        ax.set_title(name + (f" ({unit})" if unit else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.supxlabel("principal component 1")
    fig.supylabel("principal component 2")
    fig.tight_layout()
    return fig


def percentile_boxes(long: pd.DataFrame, order, labels: dict | None = None, ncols: int = 4):
    """Fig. 4: per attribute, a box of the top-k percentile ranks for each method (lower is better)."""
    names = [n for n in attributes.NAMES if n in set(long.attribute)]
    nrows = math.ceil(len(names) / ncols)
    w = PAGE_WIDTH / ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, 0.85 * w * nrows), squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    order = [m for m in order if m in set(long.method)]
    palette = dict(zip(order, sns.color_palette("colorblind", len(order))))
    for ax, name in zip(axes.flat, names):
        g = long[long.attribute == name]
        sns.boxplot(data=g, x="method", y="percentile", hue="method", order=order, hue_order=order,
                    palette=palette, ax=ax, showfliers=False, width=0.7, legend=False)
        ax.axhline(50, color="0.5", ls="--", lw=0.7)
        ax.set(xlabel="", ylabel="percentile" if ax in axes[:, 0] else "", ylim=(0, 100))
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([""] * len(order))
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[m]) for m in order]
    ncol = min(len(order), 3)
    fig.legend(handles, [(labels or {}).get(m, m) for m in order], loc="lower center", ncol=ncol,
               frameon=False, fontsize=8)
    rows = math.ceil(len(order) / ncol)
    fig.tight_layout(rect=(0, 0.2 * rows / fig.get_figheight() + 0.01, 1, 1))
    return fig


def benchmark_ratios(bench: pd.DataFrame):
    """One bar per benchmark (the newest row of each in bench/results.csv): baseline seconds / ours,
    on a log axis; bars left of 1 are where ours is slower (e.g. a compressed index trading time
    for memory)."""
    latest = bench.groupby("benchmark", sort=False).tail(1).reset_index(drop=True)
    if latest.empty:
        raise ValueError("benchmark_ratios: no rows")
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 0.42 * len(latest) + 1))
    colors = ["C2" if r >= 1 else "C3" for r in latest.ratio]
    ax.barh(range(len(latest)), latest.ratio, color=colors)
    ax.set_yticks(range(len(latest)), [b if len(b) <= 70 else b[:67] + "..." for b in latest.benchmark],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1, color="k", lw=0.8)
    for i, r in enumerate(latest.ratio):
        ax.text(r, i, f" {r:.3g}×", va="center", fontsize=8)
    ax.set(xlabel="ratio = baseline seconds / ours (log; > 1: ours faster or within the goal)")
    fig.tight_layout()
    return fig


def stage_shares(stages: pd.DataFrame, goal_s: float | None = None):
    """One bar per stage of a run (columns `stage`, `seconds`), labelled with its seconds and
    share of the total; a second bar of the total against the goal, when one is given."""
    if stages.empty:
        raise ValueError("stage_shares: no stages")
    total = float(stages.seconds.sum())
    fig, (ax, tot) = plt.subplots(2, 1, figsize=(PAGE_WIDTH, 0.3 * len(stages) + 1.6),
                                  height_ratios=[len(stages), 1.4])
    ax.barh(stages.stage, stages.seconds, color="C0")
    for i, sec in enumerate(stages.seconds):
        ax.text(sec, i, f" {sec:.0f} s ({sec / total:.0%})", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, stages.seconds.max() * 1.25)
    ax.set(xlabel="seconds in this run (a stage reused from cache shows the run that made it)")
    tot.barh(["all stages"], [total], color="C2" if goal_s is None or total <= goal_s else "C3")
    if goal_s:
        tot.axvline(goal_s, color="k", lw=1)
        tot.text(goal_s, 0.45, f" goal {goal_s / 60:.0f} min", fontsize=8, va="bottom")
    tot.text(total, 0, f" {total / 60:.1f} min", va="center", fontsize=8)
    tot.set_xlim(0, max(total, goal_s or 0) * 1.2)
    tot.set(xlabel="seconds")
    fig.tight_layout()
    return fig


VERDICT_COLORS = {"holds": "C2", "not separable": "0.55", "reversed": "C3"}


def r2_readings(r2: pd.DataFrame, order=None, labels: dict | None = None, floor: float = -0.2,
                paper_range: tuple[float, float] | None = (0.71, 0.96)):
    """Fig. 2 with its uncertainty: R² per attribute (registry order), one bar per reading (column
    `reading`) with its patient-bootstrap interval (`r2_lo`, `r2_hi`) as an error bar. Bars below
    the floor are cut and labelled; the legend sits above the axes, clear of the bars."""
    order = order or list(dict.fromkeys(r2.reading))
    names = [n for n in attributes.NAMES if n in set(r2.attribute)]
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.6))
    if paper_range:
        ax.axhspan(*paper_range, color="0.9", zorder=0, label=f"paper: {paper_range[0]}–{paper_range[1]}")
    width = 0.8 / len(order)
    for j, reading in enumerate(order):
        g = r2[r2.reading == reading].set_index("attribute").reindex(names)
        x = np.arange(len(names)) + (j - (len(order) - 1) / 2) * width
        v = g.r2.to_numpy(float)
        shown = np.clip(np.nan_to_num(v, nan=floor), floor, None)
        ax.bar(x, shown - floor, bottom=floor, width=width, color=f"C{j}", zorder=2,
               label=(labels or {}).get(reading, reading))
        if {"r2_lo", "r2_hi"} <= set(g.columns):
            lo = np.clip(g.r2_lo.to_numpy(float), floor, None)
            hi = np.clip(g.r2_hi.to_numpy(float), floor, None)
            ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(v) & (v >= floor)
            ax.errorbar(x[ok], shown[ok], yerr=[shown[ok] - lo[ok], hi[ok] - shown[ok]], fmt="none",
                        ecolor="0.15", elinewidth=0.8, capsize=1.5, zorder=3)
        _label_cut(ax, x, v, floor)
    _r2_axes(ax, names, floor, ncols=len(order) + bool(paper_range))
    fig.tight_layout()
    return fig


def ordering_differences(table: pd.DataFrame, labels: dict | None = None, margin: float = 2.0):
    """The Fig. 4 ordering as paired differences: one panel per comparison, per attribute the
    difference of median percentiles (A − B) with its bootstrap interval, coloured by verdict.
    Below zero: A retrieves closer values. The `within` comparison shades its ±margin band."""
    comps = list(dict.fromkeys(table.comparison))
    names = [n for n in attributes.NAMES if n in set(table.attribute)]
    fig, axes = plt.subplots(1, len(comps), figsize=(PAGE_WIDTH, 0.28 * len(names) + 1.6),
                             sharey=True, squeeze=False)
    for ax, comp in zip(axes[0], comps):
        g = table[table.comparison == comp].set_index("attribute").reindex(names)
        y = np.arange(len(names))
        if "~" in comp:
            ax.axvspan(-margin, margin, color="0.9", zorder=0)
        ax.axvline(0, color="0.3", lw=0.7)
        for verdict, color in VERDICT_COLORS.items():
            m = (g.verdict == verdict).to_numpy()
            if m.any():
                d = g.difference.to_numpy(float)[m]
                ax.errorbar(d, y[m], xerr=[d - g.lo.to_numpy(float)[m], g.hi.to_numpy(float)[m] - d],
                            fmt="o", ms=3.5, color=color, elinewidth=1, capsize=1.5, label=verdict)
        title = textwrap.fill((labels or {}).get(comp, comp), 22, break_long_words=False)
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_yticks(y, names, fontsize=8)
    fig.supxlabel("difference of median percentiles (A − B; below 0: A retrieves closer values)",
                  fontsize=8)
    axes[0, 0].invert_yaxis()   # registry order top to bottom (the y axis is shared)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c) for c in VERDICT_COLORS.values()]
    fig.legend(handles, list(VERDICT_COLORS), loc="upper center", ncol=3, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig
