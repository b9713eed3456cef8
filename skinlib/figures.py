"""Figures shared by the notebooks: image grids and attribute distributions."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import attributes


def image_grid(images, captions=None, ncols: int = 8, size: float = 1.6, title: str | None = None):
    """Images (PIL or arrays) in a grid, each with an optional caption; returns the figure."""
    images = list(images)
    if not images:
        raise ValueError("image_grid: no images")
    captions = list(captions) if captions is not None else [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"image_grid: {len(images)} images but {len(captions)} captions")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, cap in zip(axes.flat, images, captions):
        ax.imshow(np.asarray(im))
        ax.set_title(cap, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def attribute_distributions(frames: dict[str, pd.DataFrame], names=None, ks: pd.DataFrame | None = None,
                            ncols: int = 4):
    """One panel per attribute, a density per labelled frame (frames keyed by short names).
    Heavy-tailed size attributes are drawn on a log axis. `ks` (from metrics.ks_by_attribute)
    adds the statistic to each title."""
    atts = attributes.resolve(names)
    long = pd.concat([f[[a.name for a in atts]].assign(source=label) for label, f in frames.items()],
                     ignore_index=True)
    nrows = math.ceil(len(atts) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows), squeeze=False)
    ksd = dict(zip(ks["attribute"], ks["ks"])) if ks is not None else {}
    for ax in axes.flat[len(atts):]:
        ax.axis("off")
    for i, (ax, att) in enumerate(zip(axes.flat, atts)):
        log = att.name in ("areaMM2", "perimeterMM", "minorAxisMM", "clin_size_long_diam_mm")
        sns.histplot(long, x=att.name, hue="source", stat="density", common_norm=False, element="step",
                     fill=False, bins=40, log_scale=log, ax=ax, legend=(i == 0))
        t = att.name + (f"  (KS {ksd[att.name]:.2f})" if att.name in ksd else "")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(att.unit, fontsize=8)
        ax.set_ylabel("")
    fig.tight_layout()
    return fig
