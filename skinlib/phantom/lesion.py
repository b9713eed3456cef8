"""One lesion crop: targets, drawing, measurement, nuisances (`draw_lesion`), and what it holds
(`Lesion`)."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np

from skinlib import attributes, color, measure
from skinlib.phantom.acquisition import _acquire
from skinlib.phantom.patients import Patient, make_patient
from skinlib.phantom.render import _skin_and_lesion
from skinlib.phantom.reference import TARGETS
from skinlib.phantom.shape import FOV_MM
from skinlib.phantom.targets import sample_targets

SIZE_RANGE = (90, 160)  # px, inclusive


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
    contour: np.ndarray        # (shape.N_VERT, 2) mm
    mm_per_px: float
    attributes: dict           # the 16 measured attributes, registry short names
    extras: dict               # other measures (L, Lext, stdL, eccentricity, ...)
    targets: dict              # what the drawing aimed at (NOT ground truth)
    nuisance: dict = field(default_factory=dict)


def draw_lesion(rng=None, *, targets: dict | None = None, patient: Patient | None = None,
                size_px: int | None = None, nuisances: bool = True, nuisance_rng=None) -> Lesion:
    """Draw ONE lesion crop and measure it.

    rng: a numpy Generator or an int seed (None: fresh entropy). targets: overrides of the
    sampled targets, by name in TARGETS (e.g. {"areaMM2": 20.0}). patient: shares skin tone,
    hair and freckles (default: a random one). size_px: image side in [90, 160] (default
    drawn). nuisances=False returns the clean picture (no lighting, blur, hair or JPEG loss).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if patient is None:   # a patient of its own: a random seed and index
        patient = make_patient(int(rng.integers(0, 2 ** 31)), int(rng.integers(0, 2 ** 31)))
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
