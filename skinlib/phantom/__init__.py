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

The modules, in the order a crop is made:

    streams            one random generator per (seed, key)
    reference          the committed summary of the real rows (fit, load)
    targets            per-lesion targets from the summary's Gaussian copula
    patients           skin tone, hair, freckles shared by a patient's lesions
    shape              the field of view and the star-shaped contour solver
    fields             smooth random fields (texture, variegation, freckles)
    render             the clean L*a*b* rendering of skin and lesion
    acquisition        nuisances on the picture: hair, glints, lighting, blur, JPEG
    lesion             `draw_lesion`: one crop, drawn and measured
    malignancy_model   P(malignant | 16 attributes) and the diagnosis columns
    metadata           one train-metadata.csv row
    release            `generate`: the release's files
    cli                ``python -m skinlib.phantom``
"""
from __future__ import annotations

from skinlib.phantom.cli import main
from skinlib.phantom.lesion import SIZE_RANGE, Lesion, draw_lesion
from skinlib.phantom.malignancy_model import (MALIGNANCY_KNOTS, MALIGNANCY_PATH, diagnosis_columns,
                                              load_malignancy, make_malignancy, malignancy_basis,
                                              malignancy_logit, malignancy_probability)
from skinlib.phantom.metadata import ATTRIBUTION, LICENSE, metadata_row
from skinlib.phantom.patients import Patient, fitzpatrick_from_ita, make_patient, plan_patients
from skinlib.phantom.reference import REFERENCE_PATH, SKIN, TARGETS, load_reference, make_reference
from skinlib.phantom.release import (ID_FORMAT, IMAGE_FILE, METADATA_FILE, NUISANCE_FILE, _draw_image,
                                     generate)
from skinlib.phantom.shape import FOV_MM, LOBE_SKEW, N_VERT, polygon_radius_at, solve_shape
from skinlib.phantom.targets import sample_targets

__all__ = [
    "ATTRIBUTION", "FOV_MM", "ID_FORMAT", "IMAGE_FILE", "LICENSE", "LOBE_SKEW", "MALIGNANCY_KNOTS",
    "MALIGNANCY_PATH", "METADATA_FILE", "NUISANCE_FILE", "N_VERT", "REFERENCE_PATH", "SIZE_RANGE", "SKIN",
    "TARGETS", "Lesion", "Patient", "diagnosis_columns", "draw_lesion", "fitzpatrick_from_ita", "generate",
    "load_malignancy", "load_reference", "main", "make_malignancy", "make_patient", "make_reference",
    "malignancy_basis", "malignancy_logit", "malignancy_probability", "metadata_row", "plan_patients",
    "polygon_radius_at", "sample_targets", "solve_shape",
    "_draw_image",   # chapter 0 draws crops exactly as the release does, without writing one
]
