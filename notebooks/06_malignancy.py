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
# # From grounded attributes to malignancy
#
# The paper grounds the model in quantitative lesion attributes because such attributes predict
# malignancy. SLICE-3D's metadata carries the diagnosis (`target`: 393 malignant lesions of
# 401,059). This chapter asks how much of it each kind of feature carries: the model's image vector
# before and after fine-tuning, the baseline encoder's, the attributes the model *reads* from the
# picture, and the measured attributes themselves. Each gets the same probe, a logistic regression
# whose regularisation is chosen by cross-validation over training *patients*, scored once on test
# patients with the ISIC 2024 challenge's metric.
#
# On the embedded default the label is the phantom's: drawn from the 16 measured attributes by a
# model fitted on 5,000 real SLICE-3D rows (`skinlib.phantom`), at the 7.9 % of malignant lesions of
# those rows rather than the release's 0.1 %, so that a test split holds enough of them to score.
# There the true attributes hold everything the label depends on and mark the ceiling; on the real
# release they do not. {doc}`01_data` shows how the label leans on each attribute, beside the real rows.

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
n_boot = 1000  # patient bootstrap resamples for the 95% intervals
seed = None  # folds and bootstrap (None: the profile's seed)

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from skinlib import (attributes, chapter, config, malignancy, malignancy_figures,
                     phantom, resumable, study)

ch = chapter.open(profile, out, "06_malignancy")
cfg, run = ch.cfg, ch.run
seed = cfg["seed"] if seed is None else seed
_, metadata_csv = ch.release_files
labels = pd.read_csv(metadata_csv, usecols=["isic_id", "target"])
manifest = ch.manifest.merge(labels, on="isic_id", how="left", validate="one_to_one")
if manifest.target.isna().any():
    n = int(manifest.target.isna().sum())
    raise ValueError(f"{metadata_csv}: no target for {n} manifest rows")
manifest["target"] = manifest.target.astype(int)
display(manifest.groupby("split").agg(images=("isic_id", "size"),
                                      patients=("patient_id", "nunique"),
                                      malignant=("target", "sum")))

# %% [markdown]
# ## What is scored on what
#
# The probes are fitted on every training image. {doc}`Chapter 3 <03_predict>` asks its questions
# of the first `predict.n_images` test images only, and of no training image, and
# {doc}`chapter 4 <04_embed>` extracts vectors for every training image but only for its
# `embed.n_queries` query images of the test split. So every probe is scored on the test images
# that have both predictions and vectors (the same images for every row, so that rows compare),
# and the probe "fit on predicted", which needs predicted attributes on the training images, is
# not run here.

# %% tags=["hide-input"]
train = manifest[manifest.split == "train"].reset_index(drop=True)
# the headline reading
pred = pd.read_csv(config.reading_path(run, cfg["predict"]["reading"]))
q_ids = study.open_vectors(run, "tuned_queries").ids   # the ids only: no vector is read
scored = [i for i in q_ids if i in set(pred.isic_id)]
test = manifest.set_index("isic_id").loc[scored].reset_index()
print(f"training images: {len(train):,} ({train.target.sum()} malignant); "
      f"test images scored: {len(test):,} ({test.target.sum()} malignant, "
      f"{test.patient_id.nunique()} patients) of {len(ch.test):,} in the test split")

true_train = malignancy.attribute_matrix(train, train.isic_id)
true_test = malignancy.attribute_matrix(test, test.isic_id)
pred_test, n_unread = malignancy.predicted_attributes(pred, test.isic_id)
print(f"predicted attributes: {n_unread} of {pred_test.size} values missing "
      "(a reply that did not parse, or a question not asked because the attribute is "
      "excluded); the probe fills them with the training median and counts them "
      "(n_imputed_test)")

if test.target.nunique() == 2:
    # h_im (fine-tuned, untuned) and the encoder's vector, read shard by shard as
    # float32: the 16 image+text vectors per image are not read
    vec = study.image_features(run, train.isic_id, test.isic_id)
    sets = malignancy.feature_sets(
        true_train=true_train, true_test=true_test, predicted_test=pred_test,
        embeddings={"h_im fine-tuned": vec["tuned"], "h_im untuned": vec["untuned"],
                    "baseline encoder": vec["encoder"]})
else:
    # too few test images were asked for both classes to be among them (a small
    # profile): only the true attributes can be scored, on the whole test split
    test = manifest[manifest.split == "test"].reset_index(drop=True)
    print("the scored images hold one class only; scoring the true attributes on all "
          f"{len(test)} test images")
    sets = {"true attributes": (true_train,
                                malignancy.attribute_matrix(test, test.isic_id))}

# %% [markdown]
# ## The probes
#
# One row per feature set: ROC-AUC and the challenge's partial AUC above 80 % true positive rate
# (0 to 0.2; a random ranking scores 0.02), each with a 95 % interval from resampling test
# patients; `c` is the regularisation chosen by cross-validation over training patients in `folds`
# folds (5, or as many as there are training patients with a malignant lesion where that is fewer),
# and the last two columns count the missing values filled with training medians.

# %% tags=["hide-input"]
res = malignancy.run_probes(sets, train, test, n_boot=n_boot, seed=seed)
paths = malignancy.write_results(res, run)
display(res.table.round(3))
for name, why in res.skipped.items():
    print(f"not scored: {name} ({why})")
for name, p in res.probes.items():
    if not p.converged:
        print(f"{name}: the final fit stopped at {malignancy.MAX_ITER} iterations "
              "before converging")
skipped = {k for k in res.n_boot_skipped.values() if k}
# the draws are shared, so on the same test images every set skips the same resamples
if skipped:
    print(f"{', '.join(map(str, sorted(skipped)))} of {n_boot} resamples held no "
          "malignant (or no benign) lesion and were not scored")
print(f"-> {config.shown(paths[0], run)}\n-> {config.shown(paths[1], run)}")

# %% [markdown]
# The attribute probe is kept for the explorer ({doc}`07_explore`), which scores every lesion it
# shows from the attributes the model reads, as the row "predicted attributes (fit on true)" does:
# the training medians, standardisation, coefficients and C, as sealed JSON.

# %% tags=["hide-input"]
# "fit on true" and "true attributes" are one fit (the training images' true
# attributes), so the probe exists whenever the true attributes were scored, also when
# the read ones could not be
probe_path = config.malignancy_probe_path(run)
if "true attributes" in res.probes:
    malignancy.save_probe(res.probes["true attributes"], probe_path)
    print(f"-> {config.shown(probe_path, run)}")
else:
    resumable.remove(probe_path)   # no stale probe from an earlier run of this folder
    print("no attribute probe was fitted: "
          "the explorer shows no malignancy probability")

# %% [markdown]
# On the phantom the label was drawn from P(malignant | the 16 attributes) itself, an additive
# model with bends (`skinlib.phantom`), not a straight line per attribute: that probability ranks
# the test images as well as anything can. Compare it with the row "true attributes", the linear
# probe on the same values: the gap is what a straight line per attribute misses.

# %% tags=["hide-input"]
if cfg["data"]["source"] == "phantom":
    raw = attributes.named(pd.read_csv(metadata_csv)).set_index("isic_id")
    values = raw.loc[test.isic_id, list(attributes.NAMES)].to_numpy()
    own = phantom.malignancy_logit(values)
    print(f"the phantom's own model on these {len(test)} test images: "
          f"AUC {malignancy.roc_auc(test.target, own):.3f}, "
          f"pAUC {malignancy.partial_auc(test.target, own):.3f}")

# %% [markdown]
# ## ROC curves
#
# Left, the whole curves; the challenge scores only the shaded band, where at least 80 % of the
# malignant lesions are caught. Right, that band enlarged: the filled area under each curve is its
# partial AUC.

# %% tags=["hide-input"]
fig = malignancy_figures.roc_curves(res.scores, table=res.table)
plt.show()

# %% [markdown]
# ## What the prediction leans on
#
# The attribute probe's coefficients, per training standard deviation of each attribute (the
# probe fitted on the true attributes; "fit on true" applies the same probe to the read ones).
# Correlated attributes share their weight in ways a single coefficient does not show: the size
# attributes in particular move together.

# %% tags=["hide-input"]
probe = res.probes["true attributes"]
fig = malignancy_figures.coefficients(malignancy.coefficients(probe))
plt.show()

# %% [markdown]
# ## One lesion's score, attribute by attribute
#
# The highest-scored malignant test lesion: each bar is its standardised attribute value times the
# coefficient, and with the intercept they add up to the probe's log-odds.

# %% tags=["hide-input"]
contrib = malignancy.contributions(probe, sets["true attributes"][1], test.isic_id)
top = contrib.loc[contrib.score[test.target.to_numpy() == 1].idxmax()]
fig = malignancy_figures.contributions(top, attributes.NAMES)
plt.show()

# %% [markdown]
# ## Reading the table

# %% tags=["hide-input"]
display(Markdown(malignancy.comparison_sentence(res.table)))
