"""Training tuples D_tr (paper §3.2): for each training image, W attributes drawn uniformly without
replacement, each giving (image, Q(a), y_a(I)) with y_a written in the registry's number format."""
from __future__ import annotations

import numpy as np
import pandas as pd

from skinlib import attributes


def sample_tuples(frame: pd.DataFrame, w: int = 5, seed: int = 0, names=None) -> pd.DataFrame:
    """One row per (image, attribute): isic_id, attribute, question, answer, value.

    `frame` holds isic_id and the attribute short names (NaN = excluded for that image, e.g. a
    release 0 that means "not measured"). Each image draws min(W, available) of its available
    attributes, without replacement, from a generator seeded by `seed`: the same call gives the
    same tuples. An image with no available attribute contributes nothing (count it with
    `frame[names].notna().any(axis=1)`).
    """
    atts = attributes.resolve(names)
    if not 1 <= w <= len(atts):
        raise ValueError(f"W must be in 1..{len(atts)}, got {w}")
    missing = [a.name for a in atts if a.name not in frame.columns]
    if missing or "isic_id" not in frame.columns:
        raise KeyError(f"sample_tuples: frame lacks column(s) {(['isic_id'] if 'isic_id' not in frame.columns else []) + missing}")
    values = frame[[a.name for a in atts]].to_numpy(float)
    avail = np.isfinite(values)
    rng = np.random.default_rng(seed)
    # one uniform key per (image, attribute); the W smallest among the available ones are drawn:
    # uniform without replacement, vectorised, and independent of how many images there are
    keys = np.where(avail, rng.random(values.shape), np.inf)
    order = np.argsort(keys, axis=1, kind="stable")[:, :w]
    rows, cols = np.nonzero(np.take_along_axis(avail, order, axis=1))
    picked = order[rows, cols]
    ids = frame["isic_id"].to_numpy()[rows]
    vals = values[rows, picked]
    return pd.DataFrame({
        "isic_id": ids,
        "attribute": [atts[j].name for j in picked],
        "question": [atts[j].question for j in picked],
        "answer": [atts[j].format_answer(v) for j, v in zip(picked, vals)],
        "value": vals,
    })


def asked_rows(tup: pd.DataFrame, ids, names=None) -> dict[str, np.ndarray]:
    """{attribute: boolean array over `ids`}: which of these images a tuple asked the attribute,
    i.e. where the model was taught it (for a read-out fitted on the same answers)."""
    atts = attributes.resolve(names)
    unknown = set(tup.attribute) - set(attributes.NAMES)
    if unknown:
        raise KeyError(f"asked_rows: tuples name unknown attribute(s) {sorted(unknown)}")
    ids = pd.Index(ids)
    return {a.name: ids.isin(set(tup.isic_id[tup.attribute == a.name])) for a in atts}
