"""A synthetic phantom of SLICE-3D (ISIC 2024), written in the release's exact format.

Every image is a 15 × 15 mm field of view of skin (FOV_MM) rendered at a size drawn in
[90, 160] px, so the pixel size is ``mm_per_px = 15 / size_px`` (0.094-0.167 mm) and is recorded
per image in the nuisance sidecar. Each crop holds one lesion near its centre.

How a crop is made (`draw_lesion`):

1. Targets. A per-lesion target vector of 14 quantities (13 of the 16 attributes and the skin's
   L*) is sampled from a Gaussian copula fitted to the real 5,000-row metadata sample
   (`skinlib/data/slice3d_reference.json`: per-variable quantiles and the normal-score
   correlation matrix, built by ``--make-reference``). Skin variables share a per-patient
   component, so a patient's lesions share a skin tone.
2. Drawing parameters aimed at the targets: a star-shaped contour r(θ) (ellipse × low-order
   lobes × high-frequency jaggedness) whose axis ratio, lobes and jaggedness are solved for the
   target minor axis, area_perim_ratio and norm_border, scaled to the target area; skin tone,
   texture and freckles solved for the outside means and std; lesion colour, variegation (smooth
   noise) and an angular colour gradient solved for the inside means, norm_color and
   radial_color_std_max; a faint perilesional halo for deltaLB.
3. Ground truth. The 16 attributes are MEASURED by `skinlib.measure` from the contour polygon and
   the clean L*a*b* rendering (lesion + skin + texture + freckles). Targets are never written.
4. Acquisition nuisances are applied to the picture only, after measurement: uneven lighting,
   specular glints (white-light tiles), Gaussian blur, hair, JPEG at a varied quality. Real TBP
   values are measured on the 3D capture, not on the JPEG tile, so the truth here is likewise not
   a function of the nuisances; the nuisance sidecar records them.

5. Malignancy. `target` is drawn last, from its own random stream, so that it changes nothing
   above: target ~ Bernoulli(P(malignant | the 16 measured attributes)). P is an additive
   logistic model, one piecewise-linear function per attribute (knots at quantiles), fitted on
   the real 5,000-row sample (`skinlib/data/slice3d_malignancy.json`, built by
   ``--make-malignancy``) with the probe of the malignancy chapter (`skinlib.malignancy`: L2
   logistic regression, C from a grid by 5-fold cross-validation grouped by patient). Values are
   used as released (a colour score of 0, "not measured", is a value here), as the phantom
   writes them. Prevalence: the model is fitted where 7.9 % of the lesions are malignant (the
   sample holds all 393 malignant lesions of the release) and keeps about that rate; the
   release's 0.1 % would leave a 5,000-image phantom about 5 malignant lesions and its test
   split one or two, too few to score anything. For a logistic model, a sample that keeps every
   malignant lesion and a random share of the benign ones differs from the release in the
   intercept only (by the log of the sampling ratio): the rest, and so the ranking that AUC and
   pAUC score, carries over. Malignant lesions get a diagnosis (`iddx_*`) drawn from the
   sample's malignant diagnoses.

Output (`generate`): ``train-image.hdf5`` (one scalar fixed-length bytes dataset of JPEG bytes
per isic_id, as in the release), ``train-metadata.csv`` (the release's 55 columns, in order) and
``phantom-nuisance.csv`` (what was drawn besides the 16 attributes). Deterministic per seed,
whatever the number of workers: image i uses RNGs derived from (seed, i) and its patient's RNG
from (seed, patient); its metadata columns and its target each have their own.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import fft, ndimage, special
from scipy.spatial import ConvexHull

try:   # low-level Qhull wrapper (private; see _hull_area_perimeter)
    from scipy.spatial._qhull import _Qhull
except ImportError:   # pragma: no cover
    _Qhull = None

from skinlib import attributes, color, measure

FOV_MM = 15.0
SIZE_RANGE = (90, 160)  # px, inclusive
N_VERT = 256            # contour vertices, uniform in angle around the drawing centre
LOBE_SKEW = 4.0         # sharpness of the lobes' soft minimum: bays, not bulges (see _bays)
REFERENCE_PATH = Path(__file__).resolve().parent.parent / "data" / "slice3d_reference.json"
MALIGNANCY_PATH = Path(__file__).resolve().parent.parent / "data" / "slice3d_malignancy.json"
MALIGNANCY_KNOTS = (0.1, 0.3, 0.5, 0.7, 0.9)   # quantiles where the malignancy model may bend
ATTRIBUTION = "skin-attribute grounding phantom"
LICENSE = "CC-0"

# Attributes that follow from the drawing instead of being aimed at: the perimeter and the
# long diameter come with the shape, B = Bext + deltaB. The skin's L* ("Lext", not one of the
# 16) is aimed at so that deltaL has a skin to be relative to.
_DERIVED = ("perimeterMM", "clin_size_long_diam_mm", "B")
TARGETS = tuple(n for n in attributes.NAMES if n not in _DERIVED) + ("Lext",)
SKIN = ("Lext", "Aext", "Bext", "stdLExt")  # shared in part by a patient's lesions
_EXTRA_COLUMNS = {"Lext": "tbp_lv_Lext"}
_PROBS = np.round(np.concatenate([[0.0, 0.005, 0.01], np.arange(0.02, 0.981, 0.02),
                                  [0.99, 0.995, 1.0]]), 4)

_THETA = np.arange(N_VERT) * (2 * np.pi / N_VERT)
_COS, _SIN = np.cos(_THETA), np.sin(_THETA)
_DTHETA = 2 * np.pi / N_VERT
_COS1, _SIN1 = np.roll(_COS, -1), np.roll(_SIN, -1)
_SIN_D, _2COS_D = math.sin(_DTHETA), 2 * math.cos(_DTHETA)
# The polygon's first and second area moments (Green's theorem over the edges) are sums of the
# edge monomials r_i^a r_i+1^b (a + b = 3, 4) times fixed functions of the edge's angles: those
# functions, one column per moment (x, y, xx, yy, xy), so that a moment sum is one product.
_MOMENT_W = np.concatenate([
    np.column_stack([_COS, _SIN, 0 * _COS, 0 * _COS, 0 * _COS]),                    # r² r1
    np.column_stack([_COS1, _SIN1, 0 * _COS, 0 * _COS, 0 * _COS]),                  # r r1²
    np.column_stack([0 * _COS, 0 * _COS, _COS ** 2, _SIN ** 2, 2 * _COS * _SIN]),   # r³ r1
    np.column_stack([0 * _COS, 0 * _COS, _COS * _COS1, _SIN * _SIN1,
                     _COS * _SIN1 + _COS1 * _SIN]),                                  # r² r1²
    np.column_stack([0 * _COS, 0 * _COS, _COS1 ** 2, _SIN1 ** 2, 2 * _COS1 * _SIN1]),  # r r1³
]) * _SIN_D


def _column(name: str) -> str:
    return _EXTRA_COLUMNS.get(name) or attributes.get(name).column


# ============================================================================ reference
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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
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


# ============================================================================ malignancy model
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
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
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


@dataclass(frozen=True)
class _Copula:
    probs: np.ndarray
    quantiles: np.ndarray     # (n_targets, n_probs)
    skin: np.ndarray          # indices of SKIN in TARGETS
    rest: np.ndarray
    chol_skin: np.ndarray     # Cholesky of the skin block
    cond_gain: np.ndarray     # E[z_rest | z_skin] = gain @ z_skin
    cond_chol: np.ndarray     # Cholesky of Cov[z_rest | z_skin]
    share: float              # patient share of the skin variance


@lru_cache(maxsize=4)
def _copula(path=REFERENCE_PATH) -> _Copula:
    ref = load_reference(path)
    r = np.asarray(ref["correlation"], dtype=float)
    r = (r + r.T) / 2
    w, v = np.linalg.eigh(r)  # rounding in the JSON: make sure it is positive definite
    r = (v * np.maximum(w, 1e-6)) @ v.T
    d = np.sqrt(np.diag(r))
    r = r / d[:, None] / d[None, :]
    skin = np.array([TARGETS.index(n) for n in SKIN])
    rest = np.array([i for i in range(len(TARGETS)) if i not in skin])
    rss, rrs, rrr = r[np.ix_(skin, skin)], r[np.ix_(rest, skin)], r[np.ix_(rest, rest)]
    gain = rrs @ np.linalg.inv(rss)
    cond = rrr - gain @ rrs.T
    return _Copula(np.asarray(ref["probs"]), np.asarray([ref["quantiles"][n] for n in TARGETS]),
                   skin, rest, np.linalg.cholesky(rss), gain, np.linalg.cholesky((cond + cond.T) / 2),
                   float(ref["skin_patient_share"]))


def sample_targets(rng: np.random.Generator, patient_z=None, path=REFERENCE_PATH) -> dict[str, float]:
    """One lesion's target vector from the copula; `patient_z` (normal scores of SKIN) ties
    the skin to a patient. Returns {target name: value}."""
    cop = _copula(path)
    zs = cop.chol_skin @ rng.standard_normal(len(cop.skin))
    if patient_z is not None:
        c = math.sqrt(cop.share)
        zs = c * np.asarray(patient_z) + math.sqrt(1 - cop.share) * zs
    zr = cop.cond_gain @ zs + cop.cond_chol @ rng.standard_normal(len(cop.rest))
    z = np.empty(len(TARGETS))
    z[cop.skin], z[cop.rest] = zs, zr
    u = special.ndtr(z)
    return {n: float(np.interp(u[i], cop.probs, cop.quantiles[i])) for i, n in enumerate(TARGETS)}


# ============================================================================ patients
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, key)])))


def _pick(rng, freq: dict):
    keys = list(freq)
    p = np.asarray([freq[k] for k in keys], dtype=float)
    return keys[rng.choice(len(keys), p=p / p.sum())]


def fitzpatrick_from_ita(L: float, b: float) -> tuple[int, float]:
    """Fitzpatrick-like type I-VI from the individual typology angle ITA = atan((L*-50)/b*)
    (Chardon / Del Bino bands: > 55, 41, 28, 10, -30 degrees)."""
    ita = math.degrees(math.atan2(L - 50.0, b))
    for t, lo in enumerate((55.0, 41.0, 28.0, 10.0, -30.0), start=1):
        if ita > lo:
            return t, ita
    return 6, ita


@dataclass(frozen=True)
class Patient:
    index: int
    patient_id: str
    z_skin: np.ndarray
    age: float
    sex: str
    tile_type: str
    mean_hairs: float
    hair_lab: tuple
    freckle_density: float     # freckles per mm² of skin
    freckle_sigma_mm: float
    texture_mix: tuple         # weights of the fine / mid / coarse skin texture
    fitzpatrick: int
    ita: float


@lru_cache(maxsize=256)
def make_patient(seed: int, index: int) -> Patient:
    """Patient `index` of the phantom with `seed`: skin tone, age, sex, hair, freckles."""
    rng = _rng(seed, 1, index)
    ref, cop = load_reference(), _copula()
    z = cop.chol_skin @ rng.standard_normal(len(cop.skin))
    tone = {n: float(np.interp(special.ndtr(z[i]), cop.probs, cop.quantiles[TARGETS.index(n)]))
            for i, n in enumerate(SKIN)}
    fitz, ita = fitzpatrick_from_ita(tone["Lext"], tone["Bext"])
    age = _pick(rng, ref["age"])
    sex = _pick(rng, ref["sex"])
    hairy = rng.random() < (0.75 if sex == "male" else 0.45)
    mean_hairs = float(rng.lognormal(math.log(7.0), 0.6)) if hairy else float(rng.uniform(0, 1.5))
    if rng.random() < 0.15:   # blond / grey hair
        hair_lab = (float(rng.uniform(55, 75)), float(rng.uniform(2, 6)), float(rng.uniform(10, 22)))
    else:
        hair_lab = (float(rng.uniform(12, 32)), float(rng.uniform(1, 6)), float(rng.uniform(2, 12)))
    light = (tone["Lext"] - 30.0) / 45.0  # lighter skin, more freckles
    freckly = rng.random() < 0.25 + 0.45 * np.clip(light, 0, 1)
    density = float(rng.lognormal(math.log(0.04), 0.7)) if freckly else float(rng.uniform(0, 0.004))
    mix = rng.dirichlet([3.0, 3.0, 2.0])
    return Patient(index, f"PP_{index + 1:05d}", z, float(age) if age != "nan" else float("nan"),
                   sex, _pick(rng, ref["tile_type"]), mean_hairs, hair_lab, density,
                   float(rng.uniform(0.15, 0.3)), tuple(float(m) for m in mix), fitz, ita)


def plan_patients(n: int, seed: int) -> np.ndarray:
    """Patient index of each of the n images: patients take lesion counts drawn from the real
    lesions-per-patient histogram (median 4, up to ~100), in order."""
    ref = load_reference()
    hist = ref["lesions_per_patient"]
    counts, weights = np.asarray(hist["count"]), np.asarray(hist["patients"], dtype=float)
    rng = _rng(seed, 0)
    out, p, total = [], 0, 0
    while total < n:
        k = int(counts[rng.choice(len(counts), p=weights / weights.sum())])
        out.append(np.full(k, p))
        total += k
        p += 1
    return np.concatenate(out)[:n]


# ============================================================================ shape
def _shape_basis(rng, k_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random unit-strength lobe (k = 2..5) and jaggedness (k = 5..k_max) series on _THETA,
    plus a phase for the ellipse. Jaggedness is normalised so that sum((k a_k)²) = 1 (its
    effect on the perimeter), lobes so that sum(a_k²) = 1, then made into bays (`_bays`)."""
    kl = np.arange(2, 6)
    al = rng.rayleigh(1.0, kl.size) / np.sqrt(kl)
    al /= np.sqrt((al ** 2).sum())
    lobes = _bays((al[:, None] * np.cos(kl[:, None] * _THETA + rng.uniform(0, 2 * np.pi, kl.size)[:, None])).sum(0))
    kj = np.arange(5, max(k_max, 8) + 1)
    aj = rng.rayleigh(1.0, kj.size) / kj
    aj /= np.sqrt(((aj * kj) ** 2).sum())
    jag = (aj[:, None] * np.cos(kj[:, None] * _THETA + rng.uniform(0, 2 * np.pi, kj.size)[:, None])).sum(0)
    return lobes, jag, rng.uniform(0, np.pi)


def _bays(lobes: np.ndarray) -> np.ndarray:
    """Low-order irregularity as bays rather than bulges: a soft minimum (softplus of sharpness
    LOBE_SKEW) flattens the outward crests of the lobe series and keeps its inward dips, then
    the series is re-centred and given back its standard deviation.

    Symmetric lobes push the outline out along the long axis, so the maximum Feret diameter ran
    ~8 % above the release's at a given area and minor axis (the release's long diameter sits
    near the moment-ellipse major axis, ~1.02x); notched outlines keep the outer extent of the
    smooth shape and take their border irregularity (solidity) from indentations.
    """
    sd = lobes.std()
    if sd <= 0:
        return lobes
    y = -np.logaddexp(0.0, -LOBE_SKEW * lobes / sd) / LOBE_SKEW
    y -= y.mean()
    return y * (sd / y.std())


def _unit_radius(q, lam, j, psi, lobes, jag) -> np.ndarray:
    t = _THETA - psi
    return q / np.sqrt((q * np.cos(t)) ** 2 + np.sin(t) ** 2) * np.exp(lam * lobes + j * jag)


def _hull_area_perimeter(points: np.ndarray) -> tuple[float, float]:
    """(area, perimeter) of the 2-D convex hull. Straight from Qhull when scipy's low-level
    wrapper is there (a third of the cost of building a full ConvexHull object, whose
    simplices, neighbours and equations the solver never reads); else via ConvexHull."""
    if _Qhull is not None:
        try:
            q = _Qhull(b"i", points, b"", required_options=b"Qt")
            try:
                return q.volume_area()
            finally:
                q.close()
        except Exception:   # a changed private API: fall back to the public one
            pass
    hull = ConvexHull(points)   # in 2-D: volume = area, area = perimeter
    return float(hull.volume), float(hull.area)


def _fast_shape(r: np.ndarray) -> tuple[float, float, float, float]:
    """(area, minor²/area, perimeter²/area, norm_border) of the star polygon with radii r.

    The same quantities as skinlib.measure (which the tests hold it to), fused in one pass
    because the shape solver calls it a couple of dozen times per lesion: the vertices sit at
    the fixed angles _THETA, so each edge's cross product is r_i r_i+1 sin(dθ) and its length
    comes from the law of cosines; the moment sums are one product with _MOMENT_W.
    """
    r1 = np.concatenate((r[1:], r[:1]))
    rr1 = r * r1
    a2 = float(rr1.sum()) * _SIN_D   # twice the area
    rr1_r, rr1_r1 = rr1 * r, rr1 * r1
    sx, sy, sxx, syy, sxy = np.concatenate((rr1_r, rr1_r1, rr1_r * r, rr1_r * r1, rr1_r1 * r1)) @ _MOMENT_W
    cx, cy = sx / (3 * a2), sy / (3 * a2)
    sxx, syy, sxy = sxx / (6 * a2) - cx * cx, syy / (6 * a2) - cy * cy, sxy / (12 * a2) - cx * cy
    a = a2 / 2.0
    ev_min = (sxx + syy) / 2 - math.sqrt(((sxx - syy) / 2) ** 2 + sxy * sxy)
    minor = 4.0 * math.sqrt(max(ev_min, 0.0))
    perim = float(np.sqrt(np.maximum(r * r + r1 * r1 - _2COS_D * rr1, 0.0)).sum())
    hull_area, hull_perim = _hull_area_perimeter(np.column_stack([r * _COS, r * _SIN]))
    score = (measure.BORDER_CONVEXITY_WEIGHT * (1.0 - hull_perim / perim)
             + measure.BORDER_SOLIDITY_WEIGHT * (1.0 - a / hull_area))
    return a, minor ** 2 / a, perim ** 2 / a, min(max(score, 0.0), 10.0)


def solve_shape(rng, area: float, minor: float, apr: float, nb: float, mm_per_px: float):
    """Radii (N_VERT,) in mm of a star-shaped contour aimed at the target area, minor axis,
    area_perim_ratio and norm_border, plus its drawing parameters.

    The scale-free targets (minor²/area, perimeter²/area, norm_border) are reached by a few
    Broyden steps on (axis ratio q, lobe strength, jaggedness); the area then fixes the scale.
    """
    r_eq = math.sqrt(area / math.pi)
    k_max = int(np.clip(2 * math.pi * r_eq / mm_per_px / 2.5, 8, 40))  # jags no finer than ~2.5 px
    lobes, jag, psi = _shape_basis(rng, k_max)
    mu_t = min(minor ** 2 / area, 4 / math.pi * 0.99)
    # p = (axis ratio, lobes², jaggedness²): perimeter and hull deficits grow ~ quadratically
    # in the amplitudes, so the squares make the residuals ~ linear and the Jacobian regular at 0
    lo, hi = np.array([0.12, 0.0, 0.0]), np.array([1.0, 0.25, 9.0])

    t = _THETA - psi
    c2, s2 = np.cos(t) ** 2, np.sin(t) ** 2   # _unit_radius, with what does not change hoisted

    def radii(p):
        return p[0] / np.sqrt(p[0] * p[0] * c2 + s2) * np.exp(math.sqrt(p[1]) * lobes + math.sqrt(p[2]) * jag)

    def resid(p):
        _, mu, a, b = _fast_shape(radii(p))
        return np.array([mu / mu_t - 1.0, math.log(a / apr), (b - nb) / 4.0])

    q0 = float(np.clip(mu_t * math.pi / 4, lo[0], hi[0]))
    ell = 4 * math.pi * (1 + ((1 - q0) / (1 + q0)) ** 2 / 4) ** 2 / q0  # Ramanujan-ish P²/A
    p = np.array([q0, float(np.clip(0.03 + 0.03 * nb, 0, 0.5)) ** 2,
                  float(np.clip(2 * math.sqrt(max(math.sqrt(apr / ell) - 1, 0.0)), 0.05, 3)) ** 2])
    f = resid(p)
    best = (np.abs(f).max(), p.copy())
    jac = np.empty((3, 3))
    for _ in range(6):   # damped Gauss-Newton, forward-difference Jacobian at every step
        if best[0] < 0.03:   # a few % is close enough: the truth is measured, not aimed
            break
        for k, h in enumerate((0.02, 0.004, 0.08)):
            dp = np.zeros(3)
            dp[k] = h if p[k] + h <= hi[k] else -h
            jac[:, k] = (resid(p + dp) - f) / dp[k]
        step = -np.linalg.lstsq(jac, f, rcond=None)[0]
        for damp in (1.0, 0.4):
            new = np.clip(p + damp * step, lo, hi)
            fn = resid(new)
            if np.abs(fn).max() < np.abs(f).max():
                break
        p, f = new, fn
        if np.abs(f).max() < best[0]:
            best = (np.abs(f).max(), p.copy())
    p = best[1]
    r = radii(p)
    area_unit = 0.5 * np.sum(r * np.roll(r, -1)) * math.sin(_DTHETA)
    scale = math.sqrt(area / area_unit)
    return r * scale, {"axis_ratio": float(p[0]), "lobes": math.sqrt(p[1]), "jaggedness": math.sqrt(p[2]),
                       "orientation_deg": float(np.degrees(psi) % 180)}


def polygon_radius_at(r: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Exact radius, at angles theta, of the star polygon with vertex radii r at _THETA."""
    return _radius_along(r, _edge_index(theta), np.cos(theta), np.sin(theta))


def _edge_index(theta: np.ndarray) -> np.ndarray:
    """Index i of the polygon edge (vertex i to i + 1) that the ray at angle theta crosses."""
    return np.floor(np.asarray(theta) * (1 / _DTHETA)).astype(np.intp) % N_VERT   # np.mod on floats is slow


def _radius_along(r: np.ndarray, i: np.ndarray, ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    """Radius of the star polygon along unit directions (ux, uy) that cross edges i: where the
    ray meets the edge, cross(v_i, e_i) / cross(u, e_i), with e_i = v_i+1 - v_i (no trigonometry,
    so the angles and directions of a pixel grid are worked out once per crop, not per radii)."""
    x, y = r * _COS, r * _SIN
    ex, ey = np.roll(x, -1) - x, np.roll(y, -1) - y
    return (x * ey - y * ex)[i] / (ux * ey[i] - uy * ex[i])


# ============================================================================ fields
@lru_cache(maxsize=None)
def _grid(size: int, mm_per_px: float) -> tuple[int, np.ndarray]:
    """FFT size (a fast length >= size + margin, so fields are not periodic on the crop) and
    the squared frequencies (cycles/mm) of its real FFT. Cached (71 sizes); read-only."""
    n = fft.next_fast_len(size + 16, real=True)
    fy = fft.fftfreq(n, d=mm_per_px)[:, None]
    fx = fft.rfftfreq(n, d=mm_per_px)[None, :]
    f2 = fx * fx + fy * fy
    f2.flags.writeable = False
    return n, f2


@lru_cache(maxsize=None)
def _grid32(size: int, mm_per_px: float) -> np.ndarray:
    """-2π² f² of `_grid` in single precision, the exponent of a Gaussian low-pass per mm²."""
    g = (-2 * np.pi ** 2 * _grid(size, mm_per_px)[1]).astype(np.float32)
    g.flags.writeable = False
    return g


def _noise_fields(rng, size: int, mm_per_px: float, sigmas_mm, weights=None, count: int = 1):
    """`count` independent smooth Gaussian fields (unit std on the crop) with a spectrum that is
    a weighted sum of Gaussian low-pass filters of the given spatial sigmas (mm), via FFT.

    The white noise filtered in the frequency domain is uniform (random bytes, 256 levels), not
    normal: each pixel sums thousands of independent coefficients, so the field is Gaussian all
    the same (same spectrum, hence same covariance), and random bytes cost a tenth of normal
    draws, which were the largest single cost of a crop."""
    n, f2 = _grid(size, mm_per_px)
    e2 = _grid32(size, mm_per_px)
    weights = np.ones(len(sigmas_mm)) if weights is None else np.asarray(weights, dtype=float)
    # single precision: plenty for a texture, and twice as fast to filter, draw and transform
    filt = sum(np.float32(w) * np.exp(np.float32(s * s) * e2) for w, s in zip(weights, sigmas_mm))
    spec = np.empty((count, *f2.shape), dtype=np.complex64)
    white = spec.view(np.float32)          # real and imaginary parts, interleaved
    white[...] = np.frombuffer(rng.bytes(white.size), dtype=np.int8).reshape(white.shape)
    white += np.float32(0.5)               # zero mean; the scale goes with the normalisation
    spec *= filt
    g = fft.irfft2(spec, s=(n, n), axes=(-2, -1))[:, :size, :size].astype(np.float64)
    g -= g.mean(axis=(1, 2), keepdims=True)
    g /= (np.sqrt(np.einsum("ijk,ijk->i", g, g) / (size * size)) + 1e-12)[:, None, None]   # the std
    return list(g)


def _blobs(size: int, mm_per_px: float, yx: np.ndarray, amp: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Sum of Gaussian blobs (peak height amp) at pixel positions yx, via FFT."""
    n, f2 = _grid(size, mm_per_px)
    img = np.zeros((n, n))
    np.add.at(img, (yx[:, 0], yx[:, 1]), amp)
    filt = np.exp(-2 * np.pi ** 2 * sigma_mm ** 2 * f2)
    out = fft.irfft2(fft.rfft2(img) * filt, s=(n, n))[:size, :size]
    return out * (2 * np.pi * (sigma_mm / mm_per_px) ** 2)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _quad_root(a: float, b: float, c: float) -> float:
    """Largest real root of a x² + b x + c = 0 that is >= 0, else 0."""
    if a <= 1e-12:
        return max(-c / b, 0.0) if abs(b) > 1e-12 else 0.0
    disc = b * b - 4 * a * c
    if disc < 0:
        return 0.0
    return max((-b + math.sqrt(disc)) / (2 * a), 0.0)


# ============================================================================ one lesion
@dataclass
class Lesion:
    """One rendered lesion: the picture, what was measured on it, and how it was drawn.

    Coordinates: `contour` is in mm with the origin at the image's top-left corner, x to the
    right and y down; pixel (row i, col j) has its centre at ((j + .5), (i + .5)) * mm_per_px.
    """
    rgb: np.ndarray            # (S, S, 3) uint8, the final picture before JPEG
    jpeg: bytes                # the bytes written to the HDF5 file
    lab: np.ndarray            # (S, S, 3) clean L*a*b* rendering, what is measured
    mask: np.ndarray           # (S, S) bool, pixel centres inside the contour
    contour: np.ndarray        # (N_VERT, 2) mm
    mm_per_px: float
    attributes: dict           # the 16 measured attributes, registry short names
    extras: dict               # other measures (L, Lext, stdL, eccentricity, ...)
    targets: dict              # what the drawing aimed at (NOT ground truth)
    nuisance: dict = field(default_factory=dict)


def _skin_and_lesion(rng, t: dict, patient: Patient, size: int, mmpp: float):
    """Draw the clean L*a*b* rendering for targets t; returns (lab, mask, contour, facts)."""
    facts = {}
    # --- contour
    area_t = float(np.clip(t["areaMM2"], 0.3, 110.0))
    r_mm, shape_p = solve_shape(rng, area_t, t["minorAxisMM"], t["area_perim_ratio"], t["norm_border"], mmpp)
    facts.update(shape_p)
    c0 = FOV_MM / 2 + np.clip(rng.normal(0, 0.5, 2), -1.2, 1.2)   # drawing centre (x, y), mm
    coords = (np.arange(size) + 0.5) * mmpp
    dx, dy = coords[None, :] - c0[0], coords[:, None] - c0[1]
    rho = np.hypot(dx, dy)
    edge = _edge_index(np.arctan2(dy, dx))
    ux = np.divide(dx, rho, out=np.ones_like(rho), where=rho > 0)   # the pixels' directions
    uy = np.divide(dy, rho, out=np.zeros_like(rho), where=rho > 0)
    for _ in range(6):  # a big lesion must leave some skin in the crop
        rpoly = _radius_along(r_mm, edge, ux, uy)
        mask = rho < rpoly
        reg = measure.regions(mask, mmpp) if mask.any() and (~mask).sum() > 0.3 * mask.size else None
        if reg is not None and reg.ext.sum() >= 0.12 * mask.size and mask.any():
            break
        r_mm = r_mm * 0.9
    if reg is None:
        raise RuntimeError("could not fit the lesion in the field of view")
    d_sign = rpoly - rho            # radial distance to the border, > 0 inside
    contour = np.column_stack([c0[0] + r_mm * _COS, c0[1] + r_mm * _SIN])
    facts.update(lesion_center_x_mm=float(c0[0]), lesion_center_y_mm=float(c0[1]))

    # --- skin: texture, freckles, halo
    pores = rng.uniform(0.05, 0.09)
    tex_l, tex_a, tex_b = _noise_fields(rng, size, mmpp, (pores, 0.3, 1.6), patient.texture_mix, count=3)
    tex_a = -0.45 * tex_l + 0.9 * tex_a   # darker mottles are a little redder
    n_fr = rng.poisson(patient.freckle_density * FOV_MM ** 2)
    yx = rng.integers(0, size, (n_fr, 2))
    fr_x, fr_y = (yx[:, 1] + 0.5) * mmpp - c0[0], (yx[:, 0] + 0.5) * mmpp - c0[1]
    keep = np.hypot(fr_x, fr_y) > polygon_radius_at(r_mm, np.arctan2(fr_y, fr_x)) + 0.6
    yx = yx[keep]
    sig_fr = patient.freckle_sigma_mm * rng.uniform(0.8, 1.2)
    fr = _blobs(size, mmpp, yx, rng.uniform(0.3, 1.0, len(yx)), sig_fr) if len(yx) else np.zeros((size, size))
    facts.update(n_freckles=int(len(yx)), freckle_sigma_mm=float(sig_fr))
    halo = np.exp(-(((-d_sign) - 1.0) / 0.5) ** 2) * (d_sign < 0)

    ext, ring, inside, core = reg.ext, reg.ring, reg.inside, reg.core
    std_t = max(t["stdLExt"], 0.3)
    fr_depth = rng.uniform(3.0, 8.0) if len(yx) else 0.0
    fr_l = -fr_depth * fr
    v_fr = fr_l[ext].var()
    if v_fr > 0.5 * std_t ** 2:     # freckles may not explain the whole skin variation
        fr_l *= math.sqrt(0.5 * std_t ** 2 / v_fr)
        fr_depth *= math.sqrt(0.5 * std_t ** 2 / v_fr)
    facts["freckle_depth_L"] = float(fr_depth)
    L_in, B_in = t["Lext"] + t["deltaL"], t["Bext"] + t["deltaB"]
    skin_b = 0.3 * std_t * tex_b + 0.4 * fr_depth * fr
    b_ring_off = skin_b[ring].mean() - skin_b[ext].mean()

    def ring_minus_ext(a):
        return a[ring].mean() - a[ext].mean()

    def cov(a, b):   # population covariance over ext; a is centred
        return float(np.dot(a, b)) / a.size

    # the skin's L* is s * tex_l + fr_l + h * halo: its std over ext and its ring contrast are
    # linear / quadratic in (s, h), so the coupled solve below runs on a few precomputed sums
    tl_e, fr_e, ha_e = tex_l[ext], fr_l[ext], halo[ext]
    tl_e = tl_e - tl_e.mean()
    fr_c, ha_c = fr_e - fr_e.mean(), ha_e - ha_e.mean()
    v_tl, v_fl, v_ha, c_fl_ha = cov(tl_e, tl_e), cov(fr_c, fr_c), cov(ha_c, ha_c), cov(fr_c, ha_c)
    c_tl_fr, c_tl_ha = cov(tl_e, fr_e), cov(tl_e, ha_e)
    d_tl, d_fr, kappa = ring_minus_ext(tex_l), ring_minus_ext(fr_l), ring_minus_ext(halo)
    h, s = 0.0, std_t
    for _ in range(3):  # texture strength s for stdLExt, halo h for deltaLB (coupled, 3 rounds)
        var_y = v_fl + 2 * h * c_fl_ha + h * h * v_ha        # y = fr_l + h * halo over ext
        s = _quad_root(v_tl, 2 * (c_tl_fr + h * c_tl_ha), var_y - std_t ** 2)
        d0 = s * d_tl + d_fr                                  # ring contrast of s * tex_l + fr_l
        rhs = t["deltaLB"] ** 2 - (t["deltaB"] - b_ring_off) ** 2
        dl = t["deltaL"] - d0
        h = float(np.clip((dl + math.sqrt(max(rhs, 0.0))) / kappa, -3.0, 3.0)) if kappa > 1e-6 and rhs > 0 else 0.0
    skin_l = s * tex_l + fr_l + h * halo
    skin_l += t["Lext"] - skin_l[ext].mean()
    skin_a = 0.45 * s * tex_a + 0.25 * fr_depth * fr
    skin_a += t["Aext"] - skin_a[ext].mean()
    skin_b += t["Bext"] - skin_b[ext].mean()
    facts.update(skin_texture_L=float(s), halo_L=float(h), pore_scale_mm=float(pores))

    # --- lesion colour: variation fields in the core, then the means
    r_eq = math.sqrt(area_t / math.pi)
    sv = float(np.clip(0.09 * r_eq, 0.1, 0.5))
    # fine variegation (scale sv) barely moves the sector means: it sets norm_color; the
    # asymmetric part (a linear gradient plus blotches on the lesion's scale) sets the radial std
    v1, v2, v3 = _noise_fields(rng, size, mmpp, (sv, 0.5 * sv), (1.0, 0.5), count=3)
    (blot,) = _noise_fields(rng, size, mmpp, (1.2 * r_eq,), count=1)
    ang = rng.uniform(0, 2 * np.pi)
    grad = (dx * math.cos(ang) + dy * math.sin(ang)) / max(r_eq, 0.3) + 0.5 * blot
    tau = 0.3  # share of the skin texture that shows through the lesion
    base = [tau * (skin_l - t["Lext"]), tau * (skin_a - t["Aext"]), tau * (skin_b - t["Bext"])]
    var_f = [v1, -0.15 * v1 + 0.3 * v2, 0.4 * v1 + 0.2 * v3]  # variegation per channel
    grd_f = [grad, -0.2 * grad, 0.4 * grad]                 # colour gradient per channel
    v, g = _solve_variation(core, base, var_f, grd_f, t["norm_color"], t["radial_color_std_max"])
    facts.update(variegation=float(v), variegation_scale_mm=float(sv), color_gradient=float(g),
                 color_gradient_angle_deg=float(np.degrees(ang) % 360))
    e_in = rng.uniform(0.08, min(0.25, measure.CORE_MM - 0.72 * mmpp))
    e_out = rng.uniform(0.1, measure.GUARD_MM - 0.72 * mmpp)
    alpha = _smoothstep((d_sign + e_out) / (e_in + e_out))
    facts["edge_width_mm"] = float(e_in + e_out)
    lab = np.empty((size, size, 3))
    for ch, (skin, tgt) in enumerate(zip((skin_l, skin_a, skin_b), (L_in, t["A"], B_in))):
        w = base[ch] + v * var_f[ch] + g * grd_f[ch]
        a_in = alpha[inside]
        c = (tgt - ((1 - a_in) * skin[inside]).mean() - (a_in * w[inside]).mean()) / a_in.mean()
        lab[..., ch] = (1 - alpha) * skin + alpha * (c + w)
    return lab, mask, contour, facts, reg


def _solve_variation(core, base, var_f, grd_f, nc_t: float, rad_t: float) -> tuple[float, float]:
    """Variegation strength v and gradient strength g so that the core colour std and the
    sector-mean std (see skinlib.measure) hit norm_color and radial_color_std_max."""
    if core.sum() < measure.MIN_CORE_PX or nc_t <= 0:
        return 0.0, 0.0
    s_t = measure.NORM_COLOR_DEADZONE + nc_t / measure.NORM_COLOR_SCALE
    yy, xx = np.nonzero(core)
    ang = np.arctan2(yy - yy.mean(), xx - xx.mean())
    idx = np.minimum(((ang + np.pi) / (2 * np.pi) * measure.N_SECTORS).astype(int), measure.N_SECTORS - 1)
    cnt = np.bincount(idx, minlength=measure.N_SECTORS).astype(float)
    ok = cnt >= measure.MIN_SECTOR_PX
    # quadratic form of the core variance, and sector means, per channel
    Q = np.zeros((3, 3))
    sect = []
    for b, vf, gf in zip(base, var_f, grd_f):
        m = np.stack([b[core], vf[core], gf[core]])
        mc = m - m.mean(axis=1, keepdims=True)
        Q += (mc @ mc.T) / (3.0 * m.shape[1])   # the (biased) covariance, as np.cov(bias=True)
        sect.append(np.stack([np.bincount(idx, weights=row, minlength=measure.N_SECTORS)[ok] / cnt[ok] for row in m]))

    S = np.stack(sect)  # (channel, term, sector)
    # the across-sector variance of channel c is w' G[c] w with w = (1, v, g): the bisection
    # below then costs a few float operations per step instead of array reductions
    Sc = S - S.mean(axis=2, keepdims=True)
    G = (np.einsum("cis,cjs->cij", Sc, Sc) / max(S.shape[2], 1)).tolist()

    def v_for(g):   # s(v, g)² = s_t²
        return _quad_root(Q[1, 1], 2 * (Q[0, 1] + g * Q[1, 2]), Q[0, 0] + 2 * g * Q[0, 2] + g * g * Q[2, 2] - s_t ** 2)

    def radial(v, g):
        if ok.sum() < 4:
            return 0.0
        var = max(c[0][0] + v * v * c[1][1] + g * g * c[2][2] + 2 * (v * c[0][1] + g * c[0][2] + v * g * c[1][2])
                  for c in G)
        return math.sqrt(max(var, 0.0)) - measure.RADIAL_DEADZONE

    if rad_t <= 0:
        return v_for(0.0), 0.0
    lo, hi = 0.0, 1.0
    while radial(v_for(hi), hi) < rad_t and hi < 64:
        hi *= 2
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        if radial(v_for(mid), mid) < rad_t:
            lo = mid
        else:
            hi = mid
    g = 0.5 * (lo + hi)
    return v_for(g), g


# ============================================================================ acquisition
def _hair_alpha(rng, size: int, mmpp: float, n: int, c0, r_eq: float) -> tuple[np.ndarray, int]:
    """Anti-aliased opacity map of n thin curved hairs (quadratic Béziers drawn at 3x and
    box-downsampled); about a third pass through the lesion. Returns (alpha, n crossing)."""
    from PIL import Image, ImageDraw

    ss = 3
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    crossing = 0
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(n):
        length = rng.uniform(4.0, 22.0)
        phi = rng.uniform(0, np.pi)
        u = np.array([math.cos(phi), math.sin(phi)])
        if rng.random() < 0.35:
            mid = np.asarray(c0) + rng.normal(0, 0.4 * r_eq, 2)
            crossing += 1
        else:
            mid = rng.uniform(-2.0, FOV_MM + 2.0, 2)
        a, b = mid - u * length * rng.uniform(0.2, 0.8), None
        b = a + u * length
        bend = np.array([-u[1], u[0]]) * rng.normal(0, 0.15) * length
        ctrl = (a + b) / 2 + bend
        pts = (1 - t) ** 2 * a + 2 * t * (1 - t) * ctrl + t ** 2 * b
        pts = pts / mmpp * ss
        width = max(1, int(round(rng.uniform(0.45, 1.3) * ss)))
        draw.line([tuple(p) for p in pts], fill=int(255 * rng.uniform(0.45, 0.95)), width=width, joint="curve")
    alpha = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) * np.float32(1 / 255)
    return alpha, crossing


def _acquire(rng, rgb: np.ndarray, patient: Patient, mmpp: float, c0, r_eq: float):
    """Acquisition nuisances on the clean sRGB picture (float, (S, S, 3)); returns the uint8
    picture, its JPEG bytes and the nuisance facts. Never touches the measured rendering."""
    from PIL import Image

    size = rgb.shape[0]
    rgb = rgb.astype(np.float32)   # the picture ends as 8-bit: single precision is plenty, and faster
    facts = {}
    n_hairs = int(rng.poisson(patient.mean_hairs * rng.uniform(0.6, 1.4)))
    if n_hairs:
        alpha, crossing = _hair_alpha(rng, size, mmpp, n_hairs, c0, r_eq)
        hair = np.asarray(patient.hair_lab) + rng.normal(0, [3, 1, 2])
        hair_rgb = color.lab_to_srgb(hair).astype(np.float32)
        rgb += alpha[..., None] * (hair_rgb - rgb)
    else:
        crossing = 0
    facts.update(n_hairs=n_hairs, n_hairs_crossing=crossing,
                 hair_color="light" if patient.hair_lab[0] > 45 else "dark")
    n_spec = 0
    if patient.tile_type == "3D: white":   # white-light tiles show specular glints
        n_spec = int(rng.poisson(12))
        if n_spec:
            yx = rng.integers(0, size, (n_spec, 2))
            glint = _blobs(size, mmpp, yx, rng.uniform(0.05, 0.25, n_spec), 0.08)
            rgb = rgb + glint.astype(np.float32)[..., None] * (1 - rgb)
    facts["n_specular"] = n_spec
    grad = rng.uniform(0.0, 0.22)
    gang = rng.uniform(0, 2 * np.pi)
    vign = rng.uniform(0.0, 0.12)
    exposure = rng.normal(1.0, 0.04)
    coords = ((np.arange(size) + 0.5) / size - 0.5) * 2  # -1..1
    light = exposure * (1 + grad / 2 * (coords[None, :] * math.cos(gang) + coords[:, None] * math.sin(gang)))
    light = light * (1 - vign * (coords[None, :] ** 2 + coords[:, None] ** 2) / 2)
    rgb = rgb * light.astype(np.float32)[..., None]
    facts.update(light_gradient=float(grad), light_angle_deg=float(np.degrees(gang)),
                 vignetting=float(vign), exposure=float(exposure))
    blur = rng.uniform(0.35, 1.15)
    rgb = ndimage.gaussian_filter(rgb, sigma=(blur, blur, 0))
    facts["blur_sigma_px"] = float(blur)
    # sensor noise of 0.6 levels before the 8-bit rounding; uniform (sd 0.6), as cheap draws
    # matter on every pixel and the noise's shape is lost in the rounding and the JPEG
    noise = rng.random(rgb.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    rgb *= np.float32(255)
    rgb += np.float32(0.6 * math.sqrt(12)) * noise
    rgb8 = np.clip(np.round(rgb, out=rgb), 0, 255, out=rgb).astype(np.uint8)
    quality = int(rng.integers(65, 91))
    buf = io.BytesIO()
    Image.fromarray(rgb8, "RGB").save(buf, "JPEG", quality=quality, subsampling=2)
    facts["jpeg_quality"] = quality
    return rgb8, buf.getvalue(), facts


# ============================================================================ public drawing API
def _patient_from_rng(rng) -> Patient:
    return make_patient(int(rng.integers(0, 2 ** 31)), int(rng.integers(0, 2 ** 31)))


def draw_lesion(rng=None, *, targets: dict | None = None, patient: Patient | None = None,
                size_px: int | None = None, nuisances: bool = True, nuisance_rng=None) -> Lesion:
    """Draw ONE lesion crop and measure it.

    rng: a numpy Generator or an int seed (None: fresh entropy). targets: overrides of the
    sampled targets, by name in TARGETS (e.g. {"areaMM2": 20.0}). patient: shares skin tone,
    hair and freckles (default: a random one). size_px: image side in [90, 160] (default
    drawn). nuisances=False returns the clean picture (no lighting, blur, hair or JPEG loss).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    patient = patient if patient is not None else _patient_from_rng(rng)
    if targets is not None:
        unknown = set(targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    size = int(np.clip(round(rng.normal(130, 16)), *SIZE_RANGE)) if size_px is None else int(size_px)
    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise ValueError(f"size_px must be in {SIZE_RANGE}, got {size_px}")
    mmpp = FOV_MM / size
    t = sample_targets(rng, patient.z_skin)
    t.update(targets or {})
    lab, mask, contour, facts, reg = _skin_and_lesion(rng, t, patient, size, mmpp)
    rgb = color.lab_to_srgb(lab, clip=False)
    out = ((rgb < 0) | (rgb > 1)).reshape(-1, 3)
    out = out[:, 0] | out[:, 1] | out[:, 2]   # pixels out of gamut (faster than any(-1))
    facts["gamut_clipped_frac"] = np.count_nonzero(out) / out.size
    if out.any():   # measure what can be shown: the in-gamut picture
        rgb = np.clip(rgb, 0.0, 1.0)
        lab = color.srgb_to_lab(rgb)
    measured = measure.measure_all(contour, lab, mask, mmpp, extras=True, reg=reg)
    attrs = {n: measured.pop(n) for n in attributes.NAMES}
    extras = measured   # L, Lext, deltaA, stdL, color_std_mean, eccentricity
    r_eq = math.sqrt(attrs["areaMM2"] / math.pi)
    c0 = (facts["lesion_center_x_mm"], facts["lesion_center_y_mm"])
    if nuisances:
        nrng = nuisance_rng if nuisance_rng is not None else rng
        rgb8, jpeg, nf = _acquire(nrng, rgb, patient, mmpp, c0, r_eq)
    else:
        from PIL import Image
        rgb8 = np.round(rgb * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb8, "RGB").save(buf, "JPEG", quality=95, subsampling=0)
        jpeg, nf = buf.getvalue(), {}
    nuis = {"fitzpatrick": patient.fitzpatrick, "ita_deg": patient.ita, "size_px": size,
            "mm_per_px": mmpp, **facts, **nf}
    return Lesion(rgb8, jpeg, lab, mask, contour, mmpp, attrs, extras, t, nuis)


# ============================================================================ the release
ID_FORMAT = "PH_{:07d}"
IMAGE_FILE, METADATA_FILE, NUISANCE_FILE = "train-image.hdf5", "train-metadata.csv", "phantom-nuisance.csv"


def _draw_image(seed: int, i: int, patient_index: int) -> Lesion:
    """Image i of the phantom with `seed`: its own RNGs, its patient's skin."""
    return draw_lesion(_rng(seed, 2, i), patient=make_patient(seed, int(patient_index)),
                       nuisance_rng=_rng(seed, 3, i))


def _quantile_draw(rng, q) -> float:
    q = np.asarray(q, dtype=float)
    return float(np.interp(rng.random(), np.linspace(0, 1, len(q)), q))


def metadata_row(isic_id: str, lesion: Lesion, patient: Patient, rng, target_rng) -> dict:
    """One row of train-metadata.csv: the 16 measured attributes in their release columns, the
    other measured colour columns, plausible values for the clinical columns (age, site; these
    are not modelled by the picture and say so in the book), and the target and diagnosis, drawn
    from `target_rng` given the attributes (`diagnosis_columns`)."""
    ref = load_reference()
    a, e = lesion.attributes, lesion.extras
    row = {attributes.get(n).column: a[n] for n in attributes.NAMES}
    site, loc, loc_simple, _ = ref["location"][_pick(rng, {i: r[3] for i, r in enumerate(ref["location"])})]
    xyz_m = ref["xyz_by_location"].get(loc_simple, [0, 0, 0, 1, 1, 1])
    xyz = [xyz_m[2 * k] + xyz_m[2 * k + 1] * rng.standard_normal() for k in range(3)]
    row.update({
        "isic_id": isic_id, "patient_id": patient.patient_id,
        "age_approx": patient.age, "sex": patient.sex, "anatom_site_general": site or None,
        "image_type": "TBP tile: close-up", "tbp_tile_type": patient.tile_type,
        "tbp_lv_C": math.hypot(a["A"], a["B"]), "tbp_lv_Cext": math.hypot(a["Aext"], a["Bext"]),
        "tbp_lv_H": math.degrees(math.atan2(a["B"], a["A"])),
        "tbp_lv_Hext": math.degrees(math.atan2(a["Bext"], a["Aext"])),
        "tbp_lv_L": e["L"], "tbp_lv_Lext": e["Lext"], "tbp_lv_color_std_mean": e["color_std_mean"],
        "tbp_lv_deltaA": e["deltaA"],
        # the lesion's L*B* contrast against all the outside skin (deltaLB uses the near ring)
        "tbp_lv_deltaLBnorm": math.hypot(a["deltaL"], a["deltaB"]),
        "tbp_lv_eccentricity": e["eccentricity"], "tbp_lv_location": loc, "tbp_lv_location_simple": loc_simple,
        "tbp_lv_nevi_confidence": _quantile_draw(rng, ref["nevi_confidence"]),
        "tbp_lv_stdL": e["stdL"],
        "tbp_lv_symm_2axis": float(rng.beta(2.5, 4.0)), "tbp_lv_symm_2axis_angle": int(rng.integers(0, 36)) * 5,
        "tbp_lv_x": xyz[0], "tbp_lv_y": xyz[1], "tbp_lv_z": xyz[2],
        "attribution": ATTRIBUTION, "copyright_license": LICENSE,
        "mel_mitotic_index": None, "mel_thick_mm": None,
        "tbp_lv_dnn_lesion_confidence": _quantile_draw(rng, ref["dnn_confidence"]),
    })
    # last, from its own stream: nothing drawn above depends on whether the lesion is malignant
    row.update(diagnosis_columns(isic_id, a, target_rng))
    return row


def _make_chunk(args) -> list[tuple[str, bytes, dict, dict]]:
    # One BLAS thread: the matrix products here are small, and with several worker processes each
    # starting a BLAS thread per core, 5,000 crops on 2 cores took 101 s instead of 36 s.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _make_chunk_1(args)


def _make_chunk_1(args) -> list[tuple[str, bytes, dict, dict]]:
    seed, start, patients = args
    out = []
    for k, p in enumerate(patients):
        i = start + k
        lesion = _draw_image(seed, i, p)
        isic_id = ID_FORMAT.format(i + 1)
        row = metadata_row(isic_id, lesion, make_patient(seed, int(p)), _rng(seed, 4, i), _rng(seed, 5, i))
        nuis = {"isic_id": isic_id, **lesion.nuisance, **{f"aim_{k2}": v for k2, v in lesion.targets.items()}}
        out.append((isic_id, lesion.jpeg, row, nuis))
    return out


def _chunks(n: int, seed: int, size: int = 64):
    pidx = plan_patients(n, seed)
    for s in range(0, n, size):
        yield seed, s, pidx[s:s + size]


def generate(n: int, out_dir, seed: int = 0, workers: int = 1, progress: bool = True):
    """Write an n-image phantom release into out_dir; returns the metadata DataFrame.

    Files: train-image.hdf5, train-metadata.csv (the release's 55 columns, in order) and
    phantom-nuisance.csv. The result depends on (n, seed) only, not on `workers`. Files are
    written under temporary names and renamed at the end, so an interrupted run never leaves
    a release that looks complete.
    """
    import h5py
    import pandas as pd
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = load_reference()
    rows, nuis = [], []
    tmp_h5 = out / (IMAGE_FILE + ".partial")
    jobs = list(_chunks(n, seed))
    bar = tqdm(total=n, desc="phantom", unit="img", disable=not progress)
    with h5py.File(tmp_h5, "w") as h5:
        if workers > 1:
            import multiprocessing as mp
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers)
            results = pool.imap(_make_chunk, jobs)
        else:
            pool, results = None, map(_make_chunk, jobs)
        try:
            for chunk in results:
                for isic_id, jpeg, row, nu in chunk:
                    h5.create_dataset(isic_id, data=np.void(jpeg))
                    rows.append(row)
                    nuis.append(nu)
                bar.update(len(chunk))
        finally:
            if pool is not None:
                pool.terminate()
            bar.close()
    meta = pd.DataFrame(rows).reindex(columns=ref["columns"])
    _atomic_csv(meta, out / METADATA_FILE)
    _atomic_csv(pd.DataFrame(nuis), out / NUISANCE_FILE)
    os.replace(tmp_h5, out / IMAGE_FILE)
    return meta


def _atomic_csv(frame, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


# ============================================================================ reference file
def _write_reference(ref: dict, path: Path) -> None:
    # one top-level key per line: small, diff-able, no pickle
    text = "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}"
                              for k, v in ref.items()) + "\n}\n"
    path.write_text(text, encoding="utf-8")


# ============================================================================ command line
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skinlib.phantom",
                                 description="Write a synthetic SLICE-3D release (HDF5 of JPEG bytes + metadata CSV).")
    ap.add_argument("--n", type=int, default=1000, help="number of images")
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes (the result does not depend on it)")
    ap.add_argument("--make-reference", metavar="CSV",
                    help="fit the reference summary from a real train-metadata CSV")
    ap.add_argument("--make-malignancy", metavar="CSV",
                    help="fit the malignancy model P(target | 16 attributes) from a real train-metadata CSV")
    a = ap.parse_args(argv)
    if a.make_reference or a.make_malignancy:
        if a.make_reference:
            make_reference(a.make_reference)
            print(f"wrote {REFERENCE_PATH}")
        if a.make_malignancy:
            make_malignancy(a.make_malignancy)
            print(f"wrote {MALIGNANCY_PATH}")
        return 0
    if not a.out:
        ap.error("--out is required")
    meta = generate(a.n, a.out, seed=a.seed, workers=a.workers)
    print(f"wrote {len(meta)} images of {meta['patient_id'].nunique()} patients to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
