"""One row of train-metadata.csv: the measured attributes in their release columns, plausible
values for the columns the picture does not model, and the label."""
from __future__ import annotations

import math

import numpy as np

from skinlib import attributes
from skinlib.phantom.lesion import Lesion
from skinlib.phantom.malignancy_model import diagnosis_columns
from skinlib.phantom.patients import Patient
from skinlib.phantom.reference import load_reference
from skinlib.phantom.streams import _pick

ATTRIBUTION = "skin-attribute grounding phantom"
LICENSE = "CC-0"


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
