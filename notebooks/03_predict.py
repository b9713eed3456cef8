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
# # Prediction: how well does the model read each attribute? (the paper's Fig. 2)
#
# Every test image (patients the model never saw) is asked all 16 questions and the reply is read as
# a number: greedily, as the paper did, and (the embedded default's headline) as the median of the
# model's whole answer distribution. R² against the measured value, per attribute, says how much of
# the attribute's variation across lesions the model has learnt to read from the image; each R²
# carries a 95% interval from resampling test patients.

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
# Overrides of the profile's `predict` section; None keeps the profile's value.
n_images = None  # test images asked (None: the profile's; the profile's null: all)
batch_size = None
constrain = None  # hold replies to the training answers' shape (None: the profile's)
reading = None  # the headline reading of r2.csv: greedy or median (None: the profile's)

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from skinlib import (answer_format, chapter, config, figures, intervals, metrics,
                     model as models, predict, qa, replies, resumable)

ch = chapter.open(profile, out, "03_predict", predict={
    "n_images": n_images, "batch_size": batch_size, "constrain": constrain,
    "reading": reading})
cfg, run, pcfg, manifest = ch.cfg, ch.run, ch.cfg["predict"], ch.manifest
# greedy is always read
readings = list(dict.fromkeys(["greedy", *pcfg["readings"], pcfg["reading"]]))
test = ch.test
if pcfg["n_images"] and pcfg["n_images"] < len(test):
    test = test.sample(pcfg["n_images"], random_state=cfg["seed"]).sort_index()
print(f"profile {cfg['name']!r}: {len(test):,} test images of {len(ch.test):,}, "
      f"{test.patient_id.nunique():,} patients, none seen in training")

# %% [markdown]
# ## Ask
#
# Batched greedy generation with left padding (a batch gives the same replies as one row at a time).
# Replies are written in shards as they come, so an interrupted run picks up where it stopped.
#
# With `constrain` (the embedded default; the `paper` profile asks as the paper did, unconstrained)
# greedy decoding takes the model's most likely token among those that keep the reply in the shape
# of the training answers: the sign, integer widths and decimals they had (`skinlib.answer_format`).
# A tiny model now and then loses count of its digits ("310.8" for a perimeter of 40.8 mm, whose
# training answers all had two integer digits), and one such reply alone can drag an attribute's R²
# far below zero. Where the model's own choice already fits, which is almost everywhere, the reply
# is the unconstrained one; where the constraint stepped in, the question is asked again without
# it, so both readings are scored below.

# %% tags=["hide-input"]
loaded = models.load_finetuned(config.finetuned_dir(run),
                               device=models.default_device())
release = ch.release
images = qa.ImageCache(release, loaded.image_processor, keep=False)
# the training answers' shapes: for constrained greedy replies, and the only answers the
# median reads
needs_shapes = pcfg["constrain"] or "median" in readings
tuples = pd.read_parquet(config.tuples_path(run))
shapes = answer_format.shapes(tuples) if needs_shapes else None
model = (loaded.model, loaded.tokenizer, loaded.image_processor)
key = str(config.finetuned_dir(run))
pred = predict.predict_sharded(*model, images, test,
                               config.reply_shards_dir(run, "greedy"), key=key,
                               batch_size=pcfg["batch_size"],
                               shapes=shapes if pcfg["constrain"] else None)
frames = {"greedy": pred}
if "median" in readings:
    frames["median"] = predict.predict_sharded(
        *model, images, test, config.reply_shards_dir(run, "median"), key=key,
        reading="median", batch_size=pcfg["batch_size"], shapes=shapes,
        beam=pcfg["beam"])
for name, frame in frames.items():
    # sealed: later stages can tell it whole
    resumable.write_csv(frame, config.reading_path(run, name))


def r2_with_interval(frame, name):
    """R² per attribute of one reading, with its patient-bootstrap interval."""
    ci = intervals.r2_intervals(frame, patient_of, seed=cfg["seed"]).drop(columns="r2")
    return metrics.r2_table(frame).merge(ci, on="attribute").assign(reading=name)


# every reading; r2.csv holds the profile's headline one
patient_of = manifest.set_index("isic_id").patient_id
table = pd.concat([r2_with_interval(f, name) for name, f in frames.items()],
                  ignore_index=True)
head = frames[pcfg["reading"]]
r2 = table[table.reading == pcfg["reading"]].reset_index(drop=True)
resumable.write_csv(table, config.r2_readings_path(run), job=head.attrs["job"])
resumable.write_csv(r2, config.r2_path(run), job=head.attrs["job"])
print(f"{len(pred):,} questions, read {' and '.join(frames)}; "
      f"headline {pcfg['reading']!r} -> {config.r2_path(run).relative_to(run)}")

# %% [markdown]
# ## Replies that are not a number
#
# A reply that is not one clean number is not scored; it is counted here per attribute (and in the
# `unparsed` column of `r2.csv`), with examples.

# %% tags=["hide-input"]
bad = replies.unparsed_report(head, by="attribute")
n_bad = int(head.pred.isna().sum())
print(f"{n_bad} of {len(head):,} {pcfg['reading']} readings ({n_bad / len(head):.2%}) "
      "are not a number")
if n_bad:
    display(bad)

# %% [markdown]
# ## R² per attribute
#
# One bar per reading, the whiskers the 95% interval over resampled test patients. *Greedy* is the
# paper's reading: the likeliest reply string. *Median* reads the model's distribution over every
# answer of the training answers' shape and takes its median, computed from the token probabilities
# along one decoding pass (`skinlib.median_reading`): at each character the branch where the
# cumulative probability, in numeric order, crosses one half. For a fixed-width answer this is the
# exact median; for integer parts of open width (the sizes) each width's prefixes are enumerated in
# the same pass, which is exact up to the profile's beam (`predict.beam` prefixes per step).
# Greedy decoding takes the likeliest first character and then its likeliest continuation: where
# the model is unsure whether a value is below or above 20, greedy replies pile up on a few stock
# answers either side, while the median moves smoothly with the model's belief.

# %% tags=["hide-input"]
fig = figures.r2_readings(table, order=list(frames), labels={
    "greedy": "greedy reply (the paper's reading)",
    "median": "median of the answer distribution"})
plt.show()
paper = ("**The paper** (Qwen2-VL-7B, real SLICE-3D, 118,495 test images): R² between "
         "0.71 and 0.96 across the 16 attributes, greedy. ")
this_run = metrics.r2_sentence(r2, len(test), cfg["name"], pcfg["reading"],
                               n_bad / len(head))
display(Markdown(paper + this_run))
if len(frames) > 1:
    on_all = f"On all {len(test):,} test images"
    display(Markdown(metrics.medians_sentence(table, on_all)))
display(r2.round(3))

# %% [markdown]
# ## Where the R² goes
#
# An attribute's R² can be low because the replies do not follow it, or because they follow it with
# too narrow (or wide) a spread or around the wrong mean. The three add up exactly:
# R² = ρ² − (ρ − σ_reply/σ_measured)² − ((μ_reply − μ_measured)/σ_measured)², with ρ the correlation
# of reply and measured value (`skinlib.metrics.r2_parts`). The top of each stack is ρ², the R² the
# replies would reach if they were rescaled afterwards.

# %% tags=["hide-input"]
parts = metrics.r2_parts_table(head)
fig = figures.r2_parts(parts)
plt.show()
display(Markdown(metrics.r2_parts_sentence(parts, head, ch.train)))

# %% [markdown]
# ## How far from the paper's scale
#
# Where an attribute is read badly, is that a ceiling of what the pictures hold, or of the
# miniature's few thousand training images? The paper trained on 282,564. A second reader asks
# the same pictures: a convolutional network built for them (`probes/cnn_reader.py`, trained from
# scratch on every attribute of every training image at the model's 112 × 112, scored on the
# same test rows as the R² above).
# A side study outside the main job runs the embedded default at other phantom sizes, changing
# only `data.n_images` (the test fraction stays 0.3), up to this chapter, and trains the CNN
# reader on each run: `python probes/scale_study.py --sizes 700 3500 --reuse 3500=runs/default`,
# which writes `probes/results/scale_r2.csv`. Each size scores its own test split (500 test
# images, or all where the split holds fewer); the first N images of a larger phantom are the
# N-image phantom, but the patient split is drawn anew, so the test images differ between sizes
# and the 95% intervals (test patients resampled) say how much that alone can move an R². The
# median over the attributes is drawn without an interval (the intervals are per attribute).
# The larger sizes are not yet run: `--sizes 700 3500 10000 30000` adds them to the same CSV
# (hours on two cores: fine-tuning and the CNN reader grow with the training images; finished
# sizes are reused).

# %% tags=["hide-input"]
scale_csv = config.scale_r2_path()
make = "python probes/scale_study.py --sizes 700 3500 --reuse 3500=runs/default"
if not cfg["name"].startswith("default"):
    print(f"no scale study for the {cfg['name']!r} profile "
          f"({config.shown(scale_csv)} holds the embedded default's)")
elif not scale_csv.exists():
    print(f"{config.shown(scale_csv)} is not there yet: `{make}` writes it")
else:
    who = {"qwen_median": "tiny Qwen2-VL, median reading",
           "qwen_greedy": "tiny Qwen2-VL, greedy", "cnn": "CNN reader"}
    rank = {m: k for k, m in enumerate(who)}  # the readers in this order, others after
    scale = pd.read_csv(scale_csv).sort_values(
        "model", kind="stable", key=lambda m: m.map(rank).fillna(len(rank)))
    hard = metrics.scale_hardest(scale, "qwen_" + pcfg["reading"])
    fig, axes = plt.subplots(1, 1 + len(hard), figsize=(figures.PAGE_WIDTH, 2.8),
                             sharex=True, sharey=True)
    for ax, a in zip(axes, [None, *hard]):
        for model, g in scale.groupby("model", sort=False):
            if a is None:
                m = g.groupby("n_train").r2.median()
                ax.plot(m.index, m.values, "o-", ms=4, label=who.get(model, model))
                continue
            r = g[g.attribute == a].sort_values("n_train")
            ax.errorbar(r.n_train, r.r2, yerr=[r.r2 - r.r2_lo, r.r2_hi - r.r2],
                        fmt="o-", ms=4, capsize=2)
        ax.axvline(metrics.PAPER_TRAIN_IMAGES, color="grey", ls=":", lw=1)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xscale="log", xlim=(300, 6e5), title=a or "R² median, all attributes")
        ax.title.set_fontsize(9)
        ax.set_xlabel("training images", fontsize=8)
    axes[0].set_ylabel("R²")
    axes[0].text(metrics.PAPER_TRAIN_IMAGES, 0.02, " paper", rotation=90, fontsize=7,
                 color="grey", ha="right", va="bottom",
                 transform=axes[0].get_xaxis_transform())
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=3,
               frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    plt.show()
    display(Markdown(metrics.scale_sentence(scale, who, hard)))
    kind = scale.model.map(lambda m: "CNN s" if m == "cnn" else "chain s")
    runs = (scale.assign(kind=kind)
            .pivot_table(index=["n_train", "n_images", "n_test", "run", "code"],
                         columns="kind", values="wall_s", aggfunc="first")
            .reset_index())
    display(Markdown("Wall time on 2 shared CPU cores, per size (chain: data, "
                     "fine-tuning and prediction; CNN: loading, training, scoring); "
                     "`code` is the commit of the checkout that held the run (a size "
                     "reused from another checkout was made by that code)."))
    display(runs)

# %% [markdown]
# ## A check by sampling
#
# Where the profile asks for it (`predict.sample.k`), each question of the first test images is
# also answered k times by sampling from the model (temperature 1, no top-k or top-p cut, in the
# answer shape when the profile constrains), and the k replies are read as their median
# (`skinlib.predict.sample`): a noisy estimate, at k generations per question, of what the median
# reading above computes in one pass.

# %% tags=["hide-input"]
scfg = pcfg.get("sample") or {}
if scfg.get("k"):
    sub = test.head(scfg["n_images"]) if scfg.get("n_images") else test
    # each image is read once per question: decode it once
    kept = qa.ImageCache(release, loaded.image_processor, keep=True)
    sampled = predict.sample(*model, kept, sub, k=scfg["k"], seed=scfg["seed"],
                             batch_size=scfg["batch_size"], shapes=shapes)
    resumable.write_csv(sampled, config.sampled_path(run))
    on_sub = {name: f[f.isic_id.isin(set(sub.isic_id))] for name, f in frames.items()}
    on_sub[f"median of {scfg['k']} samples"] = sampled
    sub_table = pd.concat([metrics.r2_table(f).assign(reading=name)
                           for name, f in on_sub.items()])
    fig = figures.r2_readings(sub_table, paper_range=None)
    plt.show()
    n_samples = len(sampled) * scfg["k"]
    n_bad_samples = int(n_samples - sampled.parsed.sum())
    display(Markdown(
        metrics.medians_sentence(sub_table, f"On the first {len(sub):,} test images")
        + f" {n_bad_samples} of {n_samples:,} samples were not a number."))
else:
    print("predict.sample.k is 0: the sampling check is skipped.")

# %% [markdown]
# ## What the format constraint changed
#
# The same model's plain greedy replies, scored alike, next to the format-constrained greedy ones;
# and every reply the constraint changed, with the reply the model would have given without it.

# %% tags=["hide-input"]
over = pred[pred.overridden]
if not pcfg["constrain"]:
    print("unconstrained run (predict.constrain false): "
          "the greedy replies above are the plain ones.")
else:
    plain = metrics.r2_table(predict.free_readings(pred)).assign(reading="plain greedy")
    held = metrics.r2_table(pred).assign(reading="format-constrained greedy")
    both = pd.concat([plain, held])
    fig = figures.r2_readings(both, paper_range=None)
    plt.show()
    display(Markdown(
        f"The constraint changed **{len(over)} of {len(pred):,} replies** "
        f"({len(over) / len(pred):.2%}). " + metrics.medians_sentence(both, "Greedy")
        + f" Not a number: {int(pred.free_pred.isna().sum())} plain, "
        f"{int(pred.pred.isna().sum())} constrained."))
    if len(over):
        shown = {"free_reply": "plain reply", "reply": "constrained reply"}
        display(over[["isic_id", "attribute", "true", "free_reply", "reply"]]
                .rename(columns=shown).head(30).round(2))

# %% [markdown]
# ## Predicted against measured
#
# One panel per attribute; the diagonal is a perfect reading. Replies far outside the measured range
# are drawn on the panel's edge (as triangles) rather than stretching the axes.

# %% tags=["hide-input"]
fig = figures.predicted_vs_true(head, r2)
plt.show()

# %% [markdown]
# ## The worst readings
#
# For the four attributes with the lowest R², the test images whose reply is furthest from the
# measured value, with both numbers: where the model is wrong, and whether the image explains it.

# %% tags=["hide-input"]
lowest = r2.sort_values("r2", na_position="first").attribute.head(4)
worst = metrics.worst_cases(head, lowest, per_attribute=4)


def caption(r):
    said = f"model {r.pred:.2f}" if r.pred == r.pred else f"reply {r.reply or '—'}"
    return f"{r.attribute}\ntrue {r.true:.2f}\n{said}"


fig = figures.image_grid([release.image(i) for i in worst.isic_id],
                         [caption(r) for r in worst.itertuples()], ncols=4)
plt.show()
