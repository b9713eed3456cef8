# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The phantom: SLICE-3D-like crops with exactly known attributes
#
# No real SLICE-3D image can be downloaded here, so the embedded default trains and retrieves on a
# phantom written in the release's own format. This chapter shows how one crop is drawn, how each of
# the 16 attributes is measured on it, and what the crops look like beside real ones.

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
n_gallery = 24  # crops in the gallery
n_timing = 100  # crops drawn to time the generator

# %% tags=["hide-input"]
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from skinlib import attributes, chapter, config, figures, measure, phantom, slice3d

ch = chapter.open(profile, out, "00_phantom")
fov, (lo, hi) = phantom.FOV_MM, phantom.SIZE_RANGE
display(Markdown(
    f"Every crop covers **{fov:g} × {fov:g} mm** of skin at {lo}–{hi} px, i.e. "
    f"**{fov / hi:.3f}–{fov / lo:.3f} mm per pixel**, recorded per image in "
    f"`{phantom.NUISANCE_FILE}`. Real SLICE-3D crops are 15 × 15 mm tiles at roughly "
    "the same sizes."))

# %% [markdown]
# ## One crop, step by step
#
# A lesion's targets come from a Gaussian copula fitted to 5,000 real metadata rows. The contour is
# a star-shaped curve (ellipse × lobes × jaggedness) solved for the target size and border; skin tone,
# texture and freckles are solved for the skin targets; the lesion's colour, variegation and an
# asymmetric colour gradient for the colour targets. The 16 attributes are then **measured** on the
# clean rendering (second panel), never copied from the targets. Hair, uneven light, blur and JPEG
# come last and touch only the picture, as the real values are measured on the 3-D capture and not
# on the 2-D tile.

# %% tags=["hide-input"]
rng = np.random.default_rng(7)
lesion = phantom.draw_lesion(rng, nuisance_rng=np.random.default_rng(8))
clean = phantom.draw_lesion(np.random.default_rng(7), nuisances=False)
reg = measure.regions(lesion.mask, lesion.mm_per_px)
overlay = np.zeros(lesion.mask.shape + (3,))
overlay[reg.ext] = (0.85, 0.85, 0.85)
overlay[reg.ring] = (0.55, 0.75, 1.0)
overlay[reg.inside] = (0.9, 0.5, 0.4)
overlay[reg.core] = (0.6, 0.2, 0.15)
fig, axes = plt.subplots(1, 4, figsize=(12, 3.4))
c = lesion.contour / lesion.mm_per_px - 0.5  # mm -> pixel coordinates
panels = [(overlay, "regions: core, inside, ring, outside skin"),
          (clean.rgb, "clean rendering (measured)"),
          (clean.rgb, "with the contour"),
          (lesion.rgb, "after hair, light, blur, JPEG")]
for k, (ax, (im, title)) in enumerate(zip(axes, panels)):
    ax.imshow(im)
    if k == 2:
        ax.plot(np.r_[c[:, 0], c[:1, 0]], np.r_[c[:, 1], c[:1, 1]], lw=0.8,
                color="cyan")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()

# %% tags=["hide-input"]
rows = []
for a in attributes.ATTRIBUTES:
    exact, how = measure.DEFINITIONS[a.name]
    aim = lesion.targets.get(a.name)
    rows.append({"attribute": a.name, "release column": a.column, "unit": a.unit,
                 "aimed at": None if aim is None else round(aim, 2),
                 "measured": round(lesion.attributes[a.name], 2),
                 "definition": how,
                 "as released?": "same definition" if exact else "analogue"})
display(pd.DataFrame(rows).set_index("attribute"))

# %% [markdown]
# *Same definition* means the release's published or checkable definition (for example
# `area_perim_ratio` = perimeter² / area exactly, and `deltaL` = `L` − `Lext`, both verified on the
# real rows). *Analogue* marks TBP's proprietary scores (`norm_border`, `norm_color`,
# `radial_color_std_max`, and the choice of ring in `deltaLB`): their formulas are not public, so the
# phantom defines its own, on the release's scale, and the realism check below holds them to the real
# distributions. "Aimed at" is what the drawing tried to reach; only "measured" is ground truth.

# %% [markdown]
# ## One attribute at a time
#
# Holding everything else of a lesion fixed and changing one target shows what the attribute means
# in the picture: rows vary the area, the border irregularity, the darkness against the skin and
# the colour asymmetry.

# %% tags=["hide-input"]
sweeps = {"areaMM2": [2, 6, 15, 40], "norm_border": [1, 3, 6, 9],
          "deltaL": [-4, -9, -16, -25], "radial_color_std_max": [0, 1, 2.5, 4.5]}
pat = phantom.make_patient(0, 3)
images, captions = [], []
for name, values in sweeps.items():
    for v in values:
        les = phantom.draw_lesion(np.random.default_rng(11), patient=pat, size_px=130,
                                  nuisances=False,
                                  targets={"areaMM2": 12.0, "norm_color": 3.0, name: v})
        images.append(les.rgb)
        captions.append(f"{name} {les.attributes[name]:.1f}\n(aimed {v:g})")
fig = figures.image_grid(images, captions, ncols=4)

# %% [markdown]
# ## A gallery across skin types
#
# Each patient has a skin tone shared by their lesions; the Fitzpatrick-like type is read from the
# individual typology angle of the skin's L\* and b\*.

# %% tags=["hide-input"]
patients = phantom.plan_patients(400, 0)
# Skin tone is the patient's, known before drawing: pick by ITA, draw only the picks.
ita = [phantom.make_patient(0, int(p)).ita for p in patients]
order = sorted(range(len(patients)), key=lambda i: -ita[i])
chosen = [order[int(k)] for k in np.linspace(0, len(order) - 1, n_gallery)]
pick = [phantom._draw_image(0, i, patients[i]) for i in chosen]
fig = figures.image_grid(
    [c.rgb for c in pick],
    [f"type {c.nuisance['fitzpatrick']}, {c.attributes['areaMM2']:.1f} mm²\n"
     f"{c.nuisance['n_hairs']} hairs, q{c.nuisance['jpeg_quality']}" for c in pick],
    ncols=6)

# %% [markdown]
# ## Beside the real crops
#
# The upper two rows hold the eight real SLICE-3D crops shipped with the project's fixtures, the
# lower two phantom crops, each at its own pixel size.

# %% tags=["hide-input"]
if ch.fixtures.exists():
    real = slice3d.fixture_images(ch.fixtures)
    ours = [phantom._draw_image(0, i, patients[i]) for i in range(len(real))]
    fig = figures.image_grid(
        [im for _, im in real] + [c.rgb for c in ours],
        [f"real, {im.size[0]} px" for _, im in real]
        + [f"phantom, {c.rgb.shape[0]} px" for c in ours],
        ncols=4)
else:
    print(f"The real fixture crops are not at {config.shown(ch.fixtures)}; "
          "the comparison is left out of this run.")

# %% [markdown]
# ## How fast
#
# One process draws, measures and JPEG-encodes this many crops per second; `generate` spreads the
# work over `data.phantom_workers` processes with the same result for any number of workers.

# %% tags=["hide-input"]
t0 = time.perf_counter()
for i in range(n_timing):
    phantom._draw_image(1, i, i // 4)
dt = (time.perf_counter() - t0) / n_timing
print(f"{1000 * dt:.1f} ms per crop in one process: "
      f"{5000 * dt / 2:.0f} s for 5,000 crops on 2 workers")
