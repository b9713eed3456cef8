"""Patients: skin tone, age, sex, hair and freckles shared by a patient's lesions, and the plan of
which image belongs to which patient."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from skinlib.phantom.reference import SKIN, TARGETS, load_reference
from skinlib.phantom.streams import _pick, _rng
from skinlib.phantom.targets import _copula


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
