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
# # Data: the SLICE-3D release, validated and split by patient
#
# The paper trains and evaluates on SLICE-3D, the ISIC 2024 release: lesion crops as JPEG bytes in
# `train-image.hdf5`, keyed by `isic_id`, and one metadata row per crop in `train-metadata.csv`.
# This chapter reads the release (by default the phantom written in the same format), checks every
# row, splits by patient and saves the manifest that every later chapter reads.

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
# Overrides of the profile's `data` section; None keeps the profile's value.
n_images = None
phantom_seed = None
test_fraction = None
split_seed = None
on_error = None

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from skinlib import (attributes, chapter, config, figures, malignancy,
                     malignancy_figures, metrics, phantom, slice3d, split)

ch = chapter.open(profile, out, "01_data", data={
    "n_images": n_images, "phantom_seed": phantom_seed, "test_fraction": test_fraction,
    "split_seed": split_seed, "on_error": on_error})
cfg, run, data, fixtures = ch.cfg, ch.run, ch.cfg["data"], ch.fixtures
print(f"profile {cfg['name']!r}, data source {data['source']!r}, "
      f"run folder {config.shown(run)}")

# %% [markdown]
# ## The release files
#
# With the embedded default the release is a phantom of `n_images` crops written by
# `skinlib.phantom` ({doc}`00_phantom`); with the `paper` profile it is the real release.

# %% tags=["hide-input"]
if data["source"] == "phantom":
    phantom.generate(data["n_images"], config.phantom_dir(run),
                     seed=data["phantom_seed"], workers=data["phantom_workers"])
image_h5, metadata_csv = ch.release_files

ds = slice3d.Slice3D(image_h5, metadata_csv, on_error=data["on_error"])
if data["verify_images"]:
    ds.verify(progress=True)
print(f"{metadata_csv.name}: {len(ds)} usable crops")

# %% [markdown]
# ## What was excluded, and why
#
# Nothing is dropped silently: a crop whose image does not decode or is not a lesion crop (not RGB,
# too large, not square enough), whose id is missing from one of the two files, or whose `target` is
# not 0 or 1, is excluded whole; a missing attribute value (NaN, or 0 for the two colour scores
# whose release value 0 means "not measured", the paper authors' rule) or one outside what the
# attribute can take excludes only that attribute of that crop. Images in the HDF5 without a CSV
# row, and RGB images stored in another format than JPEG (kept), are counted too. The table below
# counts the entries of `exclusions.csv` (one line per excluded row, masked value or counted image),
# by reason; its `effect` column says what each did.

# %% tags=["hide-input"]
report = ds.report()
display(report)
table = ds.exclusion_table()
config.exclusions_path(run).parent.mkdir(parents=True, exist_ok=True)
table.to_csv(config.exclusions_path(run), index=False)
print(f"exclusions written to {config.shown(config.exclusions_path(run), run)} "
      f"({len(table)} rows)")

# %% [markdown]
# ## Split by patient
#
# Lesions of one patient share skin, camera and lighting; a patient in both halves would leak. The
# split is seeded and saved as a parquet manifest with the 16 attribute values under their short
# names; with labels, both halves hold malignant lesions, which {doc}`chapter 6 <06_malignancy>`
# fits and scores on.

# %% tags=["hide-input"]
frame = ds.attribute_frame()
labels = ds.labels()   # None for a release without `target`
sp = split.patient_split(frame, test_fraction=data["test_fraction"],
                         seed=data["split_seed"],
                         target=None if labels is None else labels.target.to_numpy())
manifest = frame.merge(sp[["isic_id", "split"]], on="isic_id", validate="one_to_one")
split.save_manifest(manifest, config.manifest_path(run))
summary = manifest.groupby("split").agg(images=("isic_id", "size"),
                                        patients=("patient_id", "nunique"))
if labels is not None:
    by_split = manifest.merge(labels, on="isic_id").groupby("split")
    summary["malignant"] = by_split.target.sum()
display(summary)

# %% [markdown]
# ## Sample crops and their attributes

# %% tags=["hide-input"]
sample = manifest.sample(12, random_state=0)
fig = figures.image_grid(
    [ds.image(i) for i in sample.isic_id],
    [f"{r.isic_id}\narea {r.areaMM2:.1f} mm²\n"
     f"ΔL {r.deltaL:.1f}  colour {r.norm_color:.1f}" for r in sample.itertuples()],
    ncols=4)

# %% [markdown]
# ## Beside real SLICE-3D crops
#
# The upper two rows are the eight real crops shipped with the project's test fixtures; the lower
# two are crops of this release at the same scale.

# %% tags=["hide-input"]
if fixtures.exists():
    real = slice3d.fixture_images(fixtures)
    ours = [(i, ds.image(i)) for i in manifest.isic_id[:len(real)]]
    fig = figures.image_grid(
        [im for _, im in real] + [im for _, im in ours],
        [f"real {i}" for i, _ in real] + [f"{data['source']} {i}" for i, _ in ours],
        ncols=4)
else:
    print(f"The real fixture crops are not at {config.shown(fixtures)}; "
          "the comparison is left out of this run.")

# %% [markdown]
# ## Attribute distributions
#
# Each panel compares this release's train and test halves and, where the fixtures are present,
# 5,000 real SLICE-3D metadata rows; the title gives the Kolmogorov–Smirnov statistic of this release
# against the real rows (0 is identical; the project's realism test asks ≤ 0.15).

# %% tags=["hide-input"]
frames = {f"{data['source']} train": manifest[manifest.split == "train"],
          f"{data['source']} test": manifest[manifest.split == "test"]}
ks = None
real5k = fixtures / "isic2024-metadata-sample5k.csv"
if real5k.exists():
    real_rows = attributes.zeros_as_missing(
        attributes.named(pd.read_csv(real5k), keep=("target",)))
    frames["real SLICE-3D (5k rows)"] = real_rows
    ks = metrics.ks_by_attribute(manifest, real_rows)
fig = figures.attribute_distributions(frames, ks=ks)

# %% [markdown]
# The train and test halves follow the same distributions, as a random patient split should.

# %% tags=["hide-input"]
if ks is not None:
    display(ks.round(3))
    print(f"largest KS statistic: {ks.ks.max():.3f} ({ks.attribute[ks.ks.idxmax()]})")

# %% [markdown]
# ## Benign and malignant lesions
#
# Malignant lesions are larger, more varied in colour and darker against their skin than benign
# ones. Below, per attribute, the median of the malignant lesions minus that of the benign ones, in
# interquartile ranges of the attribute: this release beside the 5,000 real rows (on the phantom
# the label is drawn from a model fitted on those rows, `skinlib.phantom`; {doc}`06_malignancy`
# asks how much of it the model's vectors and readings recover).

# %% tags=["hide-input"]
if labels is not None:
    with_labels = manifest.merge(labels, on="isic_id")
    diffs = {f"{data['source']}": malignancy.attribute_differences(with_labels)}
    if real5k.exists():   # read above, with its labels
        diffs["real SLICE-3D (5k rows)"] = malignancy.attribute_differences(real_rows)
    fig = malignancy_figures.attribute_differences(diffs)
    plt.show()
else:
    print(f"{metadata_csv.name} has no target column: "
          "no malignancy labels in this release")
