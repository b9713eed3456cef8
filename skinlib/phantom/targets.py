"""Per-lesion targets: the 14 quantities a drawing aims at (`reference.TARGETS`), sampled from the
Gaussian copula of the committed reference; a patient's lesions share part of their skin."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from skinlib.phantom.reference import REFERENCE_PATH, SKIN, TARGETS, load_reference


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
