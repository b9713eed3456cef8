"""Patient-grouped train/test split and the parquet manifest that records it.

The paper splits SLICE-3D by patient, no overlap: 282,564 train / 118,495 test images
(802 / 240 patients), i.e. about 70 / 30 of the images.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from skinlib import attributes as registry

SPLITS = ("train", "test")
BASE_COLUMNS = ("isic_id", "patient_id", "split")
SHOW = 5


def _first(items, n: int = SHOW) -> str:
    items = list(items)
    more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


def _check_ids(frame: pd.DataFrame, where: str) -> None:
    missing = [c for c in ("isic_id", "patient_id") if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
    for c in ("isic_id", "patient_id"):
        empty = frame[c].isna().to_numpy()
        if empty.any():
            raise ValueError(f"{where}: {empty.sum()} row(s) with empty {c}, "
                             f"rows {_first(np.flatnonzero(empty))}")
    dup = frame["isic_id"].duplicated()
    if dup.any():
        raise ValueError(f"{where}: {dup.sum()} duplicated isic_id(s): "
                         f"{_first(frame.loc[dup, 'isic_id'])}")


def _fill(sizes: pd.Series, order, target: float) -> list[int]:
    """Patients (positions in `sizes`) taken into test in `order` while that brings the test image
    count closer to `target`; at least one patient on each side."""
    test, n_test = [], 0
    for k in order:
        n = int(sizes.iloc[k])
        if abs(n_test + n - target) < abs(n_test - target):
            test.append(k)
            n_test += n
    if not test:
        test = [int(order[np.argmin([sizes.iloc[k] for k in order])])]
    elif len(test) == len(sizes):
        test.remove(max(test, key=lambda k: sizes.iloc[k]))
    return test


def _targets(frame: pd.DataFrame, target) -> np.ndarray | None:
    """Per-row 0/1 labels: `target`, else the frame's target column, else None (not checked)."""
    if target is None:
        if "target" not in frame.columns:
            return None
        target = frame["target"]
    t = np.asarray(target)
    if len(t) != len(frame):
        raise ValueError(f"patient_split: {len(t)} target values for {len(frame)} rows")
    bad = ~np.isin(t, (0, 1))
    if bad.any():
        raise ValueError(f"patient_split: target must be 0 or 1; {bad.sum()} row(s) differ, "
                         f"isic_id {_first(frame['isic_id'].to_numpy()[bad])}")
    return t.astype(int)


def patient_split(frame: pd.DataFrame, test_fraction: float = 0.3, seed: int = 0, target=None) -> pd.DataFrame:
    """isic_id, patient_id, split ("train"/"test") for each row of `frame`, in its order.

    Whole patients go to one side; patients are shuffled with `seed` and taken into test while
    that brings the test image count closer to test_fraction of all images. The result does not
    depend on the row order of `frame`.

    With labels (`target`, or the frame's `target` column) both halves must hold a malignant
    lesion, or no probe can be fitted or scored. When the split above leaves one half without,
    it is drawn again stratified (with a warning): the patients with a malignant lesion and the
    others are each filled towards test_fraction in the same shuffled order. Fewer than two
    patients with a malignant lesion is an error.
    """
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be strictly between 0 and 1, not {test_fraction!r}")
    _check_ids(frame, "patient_split")
    labels = _targets(frame, target)
    sizes = frame.groupby("patient_id", sort=True).size()
    if len(sizes) < 2:
        raise ValueError(f"patient_split needs at least 2 patients, got {len(sizes)}")

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sizes))
    test = _fill(sizes, order, test_fraction * len(frame))
    if labels is not None:
        sick = frame.assign(_t=labels).groupby("patient_id", sort=True)["_t"].max().to_numpy() == 1
        if sick.sum() < 2:
            raise ValueError(f"patient_split: {sick.sum()} patient(s) with a malignant lesion; both halves "
                             "need one, so at least 2 are required")
        if sick[test].all() or not sick[test].any():
            warnings.warn("patient_split: the seeded split left one half without a malignant lesion; "
                          "drawn again stratified by whether a patient has one", stacklevel=2)
            test = []
            for group in (sick, ~sick):
                pos = [int(k) for k in order if group[k]]   # this group, in the same shuffled order
                if len(pos) > 1:
                    part = sizes.iloc[pos]
                    test += [pos[i] for i in _fill(part, range(len(pos)), test_fraction * part.sum())]
    test_patients = set(sizes.index[test])

    out = frame[["isic_id", "patient_id"]].copy()
    out["split"] = np.where(out["patient_id"].isin(test_patients), "test", "train")
    return out.reset_index(drop=True)


def build_manifest(attribute_frame: pd.DataFrame, test_fraction: float = 0.3,
                   seed: int = 0) -> pd.DataFrame:
    """An attribute frame (isic_id, patient_id, attribute short names) plus its `split` column."""
    split = patient_split(attribute_frame, test_fraction, seed)
    out = attribute_frame.reset_index(drop=True).copy()
    out.insert(2, "split", split["split"].to_numpy())
    return out


def validate_manifest(manifest: pd.DataFrame, where: str = "manifest", attributes=None) -> tuple:
    """Check columns, ids, split values and no patient overlap; returns the attributes present.

    `attributes` (names) must all be present when given; otherwise at least one registry
    attribute column is required.
    """
    missing = [c for c in BASE_COLUMNS if c not in manifest.columns]
    if attributes is not None:
        missing += [a.name for a in registry.resolve(attributes) if a.name not in manifest.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
    present = tuple(a for a in registry.ATTRIBUTES if a.name in manifest.columns)
    if not present:
        raise ValueError(f"{where}: no attribute column (expected some of {', '.join(registry.NAMES)})")
    _check_ids(manifest, where)
    bad = ~manifest["split"].isin(SPLITS)
    if bad.any():
        raise ValueError(f"{where}: split must be one of {SPLITS}; {bad.sum()} row(s) differ, "
                         f"e.g. isic_id {_first(manifest.loc[bad, 'isic_id'])}: "
                         f"{_first(manifest.loc[bad, 'split'].unique())}")
    sides = manifest.groupby("patient_id")["split"].nunique()
    both = sides.index[sides > 1]
    if len(both):
        raise ValueError(f"{where}: {len(both)} patient(s) in both train and test: {_first(both)}")
    for a in present:
        if not pd.api.types.is_numeric_dtype(manifest[a.name]):
            raise ValueError(f"{where}: attribute column {a.name} is {manifest[a.name].dtype}, "
                             "not numeric")
    return present


def save_manifest(manifest: pd.DataFrame, path) -> Path:
    """Validate and write the manifest as parquet (pyarrow); returns the path."""
    path = Path(path)
    validate_manifest(manifest, f"manifest for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.reset_index(drop=True).to_parquet(path, engine="pyarrow", index=False)
    return path


def load_manifest(path, attributes=None) -> pd.DataFrame:
    """Read a parquet manifest and validate it (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    manifest = pd.read_parquet(path, engine="pyarrow")
    validate_manifest(manifest, str(path), attributes)
    return manifest
