"""The phantom's label: P(malignant | the 16 measured attributes), an additive logistic model fitted
on real rows (`skinlib/data/slice3d_malignancy.json`, built by ``python -m skinlib.phantom
--make-malignancy``), and the target and diagnosis columns drawn from it."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import special

from skinlib import attributes
from skinlib.phantom.reference import _committed, _sig, _write_reference, load_reference
from skinlib.phantom.streams import _pick

MALIGNANCY_PATH = Path(__file__).resolve().parent.parent / "data" / "slice3d_malignancy.json"
MALIGNANCY_KNOTS = (0.1, 0.3, 0.5, 0.7, 0.9)   # quantiles where the malignancy model may bend


def malignancy_basis(x, knots) -> np.ndarray:
    """The additive model's features of rows x (n, 16 attributes): each attribute itself, then
    max(x - knot, 0) for each of its knots (attribute-major), so that the log-odds are a sum of
    one piecewise-linear function per attribute."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    hinges = [np.maximum(x[:, [j]] - np.asarray(k, dtype=float), 0.0) for j, k in enumerate(knots)]
    return np.hstack([x, *hinges])


def make_malignancy(csv_path, out_path=MALIGNANCY_PATH, seed: int = 0, grid=None) -> dict:
    """Fit P(malignant | 16 attributes) on a real SLICE-3D metadata CSV and write it as JSON.

    An additive logistic model: per attribute a piecewise-linear function with knots at the
    CSV's quantiles MALIGNANCY_KNOTS (`malignancy_basis`), fitted by the probe of the malignancy
    chapter (`skinlib.malignancy.fit_probe`: standardised features, L2 logistic regression, C
    chosen by patient-grouped 5-fold cross-validation over `grid`, default
    `skinlib.malignancy.C_GRID`). Why not a straight line per attribute: it misses how the risk
    rises with size, and fitted on the real rows it gives their malignant lesions a median area
    well short of the one they have. Attribute values are used as released.
    """
    import pandas as pd

    from skinlib import malignancy

    df = pd.read_csv(csv_path)
    missing = [c for c in ("patient_id", "target") if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: not a SLICE-3D training metadata file, missing {missing}")
    try:
        named = attributes.named(df, keep=("patient_id", "target"))
    except KeyError as err:
        raise ValueError(f"{csv_path}: {err.args[0]}") from None
    x = named[list(attributes.NAMES)].to_numpy(dtype=float)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{csv_path}: non-finite attribute values in {bad.sum()} row(s), "
                         f"first at data row {int(np.flatnonzero(bad)[0])}")
    y = named["target"].to_numpy()
    knots = [_sig(np.quantile(x[:, j], MALIGNANCY_KNOTS)) for j in range(x.shape[1])]
    names = list(attributes.NAMES) + [f"{n}>{k:g}" for n, ks in zip(attributes.NAMES, knots) for k in ks]
    probe = malignancy.fit_probe(malignancy_basis(x, knots), y, named["patient_id"].to_numpy(), names,
                                 grid=malignancy.C_GRID if grid is None else grid, seed=seed)
    model = {
        "source": Path(csv_path).name,
        "n_rows": int(len(df)),
        "n_patients": int(df["patient_id"].nunique()),
        "n_malignant": int(y.sum()),
        "prevalence": round(float(y.mean()), 5),
        "attributes": list(attributes.NAMES),
        "knot_probs": list(MALIGNANCY_KNOTS),
        "knots": knots,
        "features": names,
        "mean": _sig(probe.mean),
        "scale": _sig(probe.scale),
        "coef": _sig(probe.coef),
        "intercept": _sig([probe.intercept])[0],
        "c": probe.c,
        "converged": probe.converged,
        "cv": {"folds": malignancy.FOLDS, "seed": seed, "c": [float(c) for c in probe.cv["c"]],
               "auc": _sig(probe.cv["cv_auc"], 4)},
    }
    _write_reference(model, out_path)
    return model


@lru_cache(maxsize=4)
def load_malignancy(path=MALIGNANCY_PATH) -> dict:
    """The committed malignancy model (see `make_malignancy`)."""
    path = Path(path)
    model = _committed(path, "malignancy model", "--make-malignancy")
    if tuple(model.get("attributes", ())) != attributes.NAMES:
        raise ValueError(f"{path} was built for attributes {model.get('attributes')}, "
                         f"expected {attributes.NAMES}; rebuild it")
    n = len(model["features"])
    bad = [k for k in ("mean", "scale", "coef") if len(model[k]) != n]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)} do not have one value per feature ({n}); rebuild it")
    return model


def malignancy_logit(x, path=MALIGNANCY_PATH) -> np.ndarray:
    """Log-odds of malignancy of rows x (n, 16 attributes in registry order, as released)."""
    m = load_malignancy(path)
    z = (malignancy_basis(x, m["knots"]) - np.asarray(m["mean"])) / np.asarray(m["scale"])
    return m["intercept"] + z @ np.asarray(m["coef"])


def malignancy_probability(values: dict, path=MALIGNANCY_PATH) -> float:
    """P(malignant) of one lesion from its 16 attributes ({short name: value})."""
    x = [[values[n] for n in attributes.NAMES]]
    return float(special.expit(malignancy_logit(x, path)[0]))


def diagnosis_columns(isic_id: str, values: dict, rng) -> dict:
    """target (drawn from `malignancy_probability`), lesion_id and the iddx_* columns."""
    malignant = bool(rng.random() < malignancy_probability(values))
    iddx = _pick(rng, load_reference()["malignant_iddx"]) if malignant else "Benign"
    parts = iddx.split("::") + [None] * 5
    return {"target": int(malignant), "lesion_id": f"PL_{isic_id[3:]}" if malignant else None,
            "iddx_full": iddx, "iddx_1": parts[0], "iddx_2": parts[1], "iddx_3": parts[2],
            "iddx_4": parts[3], "iddx_5": parts[4]}
