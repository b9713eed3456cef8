"""The committed summary of the real rows (`skinlib/data/slice3d_reference.json`): what the phantom
aims at, fitted from a real SLICE-3D metadata CSV by ``python -m skinlib.phantom --make-reference``.

The summary holds per-target quantiles and the normal-score correlation of a Gaussian copula
(`skinlib.phantom.targets` samples from it), the patients' share of the skin variance, the
lesions-per-patient histogram, the release's columns in order, and the small categorical
distributions the other metadata columns are drawn from.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import special

from skinlib import attributes, resumable

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "data" / "slice3d_reference.json"

# Attributes that follow from the drawing instead of being aimed at: the perimeter and the
# long diameter come with the shape, B = Bext + deltaB. The skin's L* ("Lext", not one of the
# 16) is aimed at so that deltaL has a skin to be relative to.
_DERIVED = ("perimeterMM", "clin_size_long_diam_mm", "B")
TARGETS = tuple(n for n in attributes.NAMES if n not in _DERIVED) + ("Lext",)
SKIN = ("Lext", "Aext", "Bext", "stdLExt")  # shared in part by a patient's lesions
_EXTRA_COLUMNS = {"Lext": "tbp_lv_Lext"}
_PROBS = np.round(np.concatenate([[0.0, 0.005, 0.01], np.arange(0.02, 0.981, 0.02),
                                  [0.99, 0.995, 1.0]]), 4)


def _column(name: str) -> str:
    return _EXTRA_COLUMNS.get(name) or attributes.get(name).column


def _sig(x, digits: int = 5):
    """Round to `digits` significant digits (keeps the JSON small)."""
    return [float(f"{v:.{digits}g}") for v in np.asarray(x, dtype=float)]


def _icc(values: np.ndarray, groups: np.ndarray) -> float:
    """One-way intraclass correlation: share of the variance between patients."""
    s = np.asarray(values, dtype=float)
    _, inv = np.unique(groups, return_inverse=True)
    means = np.bincount(inv, weights=s) / np.bincount(inv)
    within = ((s - means[inv]) ** 2).sum() / (len(s) - inv.max() - 1)
    return float(max(0.0, 1.0 - within / s.var(ddof=1)))


def make_reference(csv_path, out_path=REFERENCE_PATH) -> dict:
    """Fit the copula summary from a real SLICE-3D metadata CSV and write it as JSON.

    Stores per-target quantiles at fixed probabilities, the correlation of the normal scores
    (mid-ranks for ties, e.g. the exact zeros of norm_color), the share of skin variance between
    patients, the lesions-per-patient histogram, the 55 column names in order, and the small
    categorical / filler distributions used for the other columns.
    """
    import pandas as pd

    df = pd.read_csv(csv_path)
    cols = {n: _column(n) for n in TARGETS}
    need = list(cols.values()) + ["patient_id", "target"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: not a SLICE-3D training metadata file, missing {missing}")
    x = df[list(cols.values())].to_numpy(dtype=float)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{csv_path}: non-finite values in the target columns")
    ranks = np.column_stack([pd.Series(c).rank(method="average").to_numpy() for c in x.T])
    z = special.ndtri((ranks - 0.5) / len(x))
    corr = np.corrcoef(z, rowvar=False)
    counts = df["patient_id"].value_counts().value_counts().sort_index()
    loc = (df.assign(anatom_site_general=df["anatom_site_general"].fillna(""))
           .groupby(["anatom_site_general", "tbp_lv_location", "tbp_lv_location_simple"])
           .size().reset_index(name="n"))
    xyz = df.groupby("tbp_lv_location_simple")[["tbp_lv_x", "tbp_lv_y", "tbp_lv_z"]].agg(["mean", "std"])
    per_patient = df.groupby("patient_id").first()
    mal = df.loc[df["target"] == 1, "iddx_full"].value_counts()
    ref = {
        "source": Path(csv_path).name,
        "n_rows": int(len(df)),
        "n_patients": int(df["patient_id"].nunique()),
        "columns": list(df.columns),
        "targets": list(TARGETS),
        "probs": [float(p) for p in _PROBS],
        "quantiles": {n: _sig(np.quantile(x[:, i], _PROBS)) for i, n in enumerate(TARGETS)},
        "correlation": [_sig(row, 4) for row in corr],
        "skin_patient_share": round(float(np.mean([_icc(df[cols[n]], df["patient_id"]) for n in SKIN])), 3),
        "lesions_per_patient": {"count": [int(c) for c in counts.index], "patients": [int(v) for v in counts]},
        "sex": {str(k): int(v) for k, v in per_patient["sex"].value_counts(dropna=False).items()},
        "age": {str(k): int(v) for k, v in per_patient["age_approx"].value_counts(dropna=False).sort_index().items()},
        "tile_type": {str(k): int(v) for k, v in per_patient["tbp_tile_type"].value_counts().items()},
        "location": [[r.anatom_site_general, r.tbp_lv_location, r.tbp_lv_location_simple, int(r.n)]
                     for r in loc.itertuples()],
        "xyz_by_location": {k: _sig(v, 4) for k, v in zip(xyz.index, xyz.to_numpy())},
        "nevi_confidence": _sig(np.quantile(df["tbp_lv_nevi_confidence"], np.linspace(0, 1, 21)), 4),
        "dnn_confidence": _sig(np.quantile(df["tbp_lv_dnn_lesion_confidence"], np.linspace(0, 1, 21)), 4),
        "malignant_iddx": {str(k): int(v) for k, v in mal.items() if v >= 5},
    }
    _write_reference(ref, out_path)
    return ref


def _committed(path: Path, what: str, flag: str) -> dict:
    """A summary committed under skinlib/data/, or an error saying the command that builds it."""
    if not path.is_file():
        raise FileNotFoundError(f"phantom {what} {path} is missing; build it with "
                                f"`python -m skinlib.phantom {flag} <train-metadata.csv>`")
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=4)
def load_reference(path=REFERENCE_PATH) -> dict:
    """The committed copula summary (see `make_reference`)."""
    path = Path(path)
    ref = _committed(path, "reference", "--make-reference")
    if tuple(ref.get("targets", ())) != TARGETS:
        raise ValueError(f"{path} was built for targets {ref.get('targets')}, expected {TARGETS}; rebuild it")
    return ref


def _write_reference(ref: dict, path) -> None:
    # one top-level key per line: small, diff-able, no pickle
    text = "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}"
                              for k, v in ref.items()) + "\n}\n"
    resumable.write_text(path, text)
