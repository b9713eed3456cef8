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
# Every test image (patients the model never saw) is asked all 16 questions; the reply is generated
# greedily and parsed as a number. R² against the measured value, per attribute, says how much of the
# attribute's variation across lesions the model has learnt to read from the image.

# %% tags=["parameters"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
# Overrides of the profile's `predict` section; None keeps the profile's value.
n_images = None  # test images asked (None: the profile's; the profile's null: all)
batch_size = None
constrain = None  # hold replies to the training answers' shape (None: the profile's)

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from skinlib import answer_format, answers, config, figures, metrics, model as models, predict, qa, slice3d, split

cfg = config.load_profile(profile)
pcfg = config.section(cfg, "predict", n_images=n_images, batch_size=batch_size, constrain=constrain)
run = config.run_dir(cfg, out)
config.set_threads(cfg.get("threads", 1))
manifest = split.load_manifest(config.manifest_path(run))
test = manifest[manifest.split == "test"]
if pcfg["n_images"] and pcfg["n_images"] < len(test):
    test = test.sample(pcfg["n_images"], random_state=cfg["seed"]).sort_index()
print(f"profile {cfg['name']!r}: {len(test):,} test images of {int((manifest.split == 'test').sum()):,}, "
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

# %%
loaded = models.load_finetuned(config.finetuned_dir(run), device=models.default_device())
release = slice3d.Slice3D(*config.release_files(cfg, run), on_error=cfg["data"]["on_error"])
images = qa.ImageCache(release, loaded.image_processor, keep=False)
shapes = answer_format.shapes(pd.read_parquet(config.tuples_path(run))) if pcfg["constrain"] else None
pred = predict.predict_sharded(loaded.model, loaded.tokenizer, loaded.image_processor, images, test,
                               config.stage_dir(run, "03_predict") / "shards",
                               key=str(config.finetuned_dir(run)), batch_size=pcfg["batch_size"],
                               shapes=shapes)
predict.save(pred, config.predictions_path(run))   # sealed: later stages can tell it whole
r2 = metrics.r2_table(pred)
predict.save(r2, config.r2_path(run), job=pred.attrs["job"])
print(f"{len(pred):,} replies -> {config.predictions_path(run)}\nsummary -> {config.r2_path(run)}")

# %% [markdown]
# ## Replies that are not a number
#
# A reply that is not one clean number is not scored; it is counted here per attribute (and in the
# `unparsed` column of `r2.csv`), with examples.

# %%
bad = answers.unparsed_report(pred, by="attribute")
n_bad = int(pred.pred.isna().sum())
print(f"{n_bad} of {len(pred):,} replies ({n_bad / len(pred):.2%}) are not a number")
if n_bad:
    display(bad)

# %% [markdown]
# ## R² per attribute

# %%
fig = figures.r2_bars(r2, paper_range=(0.71, 0.96))
plt.show()
scored = r2.dropna(subset=["r2"])
paper = ("**The paper** (Qwen2-VL-7B, real SLICE-3D, 118,495 test images): R² between 0.71 and 0.96 "
         "across the 16 attributes. ")
if scored.empty:
    this = f"**This run** ({cfg['name']} profile): no attribute could be scored: no reply was a number."
else:
    lo, hi = scored.loc[scored.r2.idxmin()], scored.loc[scored.r2.idxmax()]
    this = (f"**This run** ({cfg['name']} profile, {len(test):,} test images): R² between {lo.r2:.2f} "
            f"({lo.attribute}) and {hi.r2:.2f} ({hi.attribute}), median {scored.r2.median():.2f}; "
            f"{int((scored.r2 >= 0.70).sum())} of {len(r2)} attributes reach 0.70; "
            f"{n_bad / len(pred):.2%} of the replies were not a number.")
display(Markdown(paper + this))
display(r2.round(3))

# %% [markdown]
# ## Where the R² goes
#
# An attribute's R² can be low because the replies do not follow it, or because they follow it with
# too narrow (or wide) a spread or around the wrong mean. The three add up exactly:
# R² = ρ² − (ρ − σ_reply/σ_measured)² − ((μ_reply − μ_measured)/σ_measured)², with ρ the correlation
# of reply and measured value (`skinlib.metrics.r2_parts`). The top of each stack is ρ², the R² the
# replies would reach if they were rescaled afterwards.

# %%
parts = metrics.r2_parts_table(pred)
fig = figures.r2_parts(parts)
plt.show()
p = parts.set_index("attribute")
calibrated = p.index[(p.scale + p.offset) < 0.05]
lines = [f"For {len(calibrated)} of {len(p)} attributes the replies lose less than 0.05 to spread and "
         "mean together: there the R² is what the replies track, and raising it takes a model that "
         "sees (or says) more, not a recalibration of its replies."]
train_values = manifest[manifest.split == "train"]
below = p[p.r2 < 0]
if len(below):
    means = pred.dropna(subset=["pred", "true"]).groupby("attribute")[["pred", "true"]].mean()
    lines.append("Below zero: " + "; ".join(
        f"**{a}** (ρ² {r.tracked:.2f}, offset {r.offset:.2f}: replies' mean {means.pred[a]:.2f}, "
        f"measured mean {means.true[a]:.2f}, training median {train_values[a].median():.2f})"
        for a, r in below.iterrows()) + ".")
    # offset-driven: right-skewed in training, replies below the measured mean, and R² >= 0 without the offset
    skewed = [a for a, r in below.iterrows() if train_values[a].mean() > train_values[a].median()
              and means.pred[a] < means.true[a] and r.tracked - r.scale >= 0]
    if skewed:
        lines.append(f"Where replies barely follow an attribute, greedy decoding gives a typical answer "
                     f"rather than the average one. {', '.join(skewed)} {'are' if len(skewed) > 1 else 'is'} "
                     "right-skewed in training (mean above median), so the typical answer lies below the "
                     "mean, and that offset alone takes the R² below zero.")
display(Markdown("\n\n".join(lines)))

# %% [markdown]
# ## Greedy replies and the model's whole answer
#
# Greedy decoding takes the likeliest first character and then the likeliest continuation of it.
# Where the model is unsure whether a value is below or above 20, the first digit goes to the side
# with more of its probability, and the continuation then to that side's values nearest the other
# one (19.9x or 20.0x): replies pile up on a few stock answers. The model's distribution holds more
# than its likeliest string. Here each question is also answered k times by sampling from the
# model (temperature 1, no top-k or top-p cut, in the answer shape when the profile constrains), and
# the k replies are read as their median (`skinlib.predict.sample`), on the first test images above.
# The median of k samples is itself a noisy estimate of the distribution's median, so these bars
# understate what the distribution holds. The chapter's R² (`r2.csv`) stays the greedy one, as in
# the paper.

# %%
scfg = pcfg.get("sample") or {}
if scfg.get("k"):
    sub = test.head(scfg["n_images"]) if scfg.get("n_images") else test
    kept = qa.ImageCache(release, loaded.image_processor, keep=True)   # read once per question: decode it once
    sampled = predict.sample(loaded.model, loaded.tokenizer, loaded.image_processor, kept, sub,
                             k=scfg["k"], seed=scfg["seed"], batch_size=scfg["batch_size"], shapes=shapes)
    predict.save(sampled, config.stage_dir(run, "03_predict") / "sampled.csv")
    greedy_sub = metrics.r2_table(pred[pred.isic_id.isin(set(sub.isic_id))])
    med_sub = metrics.r2_table(sampled)
    both = pd.concat([greedy_sub.assign(kind="greedy"), med_sub.assign(kind="sampled")])
    fig = figures.readout_vs_answers(both, labels={"greedy": "greedy reply",
                                                   "sampled": f"median of {scfg['k']} sampled replies"})
    plt.show()
    g, m = greedy_sub.set_index("attribute").r2, med_sub.set_index("attribute").r2
    gain = (m - g).dropna()
    top = gain.idxmax()
    stock = pred[pred.attribute == top].reply.value_counts(normalize=True).head(3)
    n_bad_samples = int(len(sampled) * scfg["k"] - sampled.parsed.sum())
    display(Markdown(
        f"On the first {len(sub):,} test images: greedy replies median R² {g.median():.2f} "
        f"({int((g >= 0.70).sum())} of {len(g)} attributes at 0.70 or more); the median of {scfg['k']} "
        f"sampled replies {m.median():.2f} ({int((m >= 0.70).sum())} of {len(m)}), higher for "
        f"{int((gain > 0).sum())} of {len(gain)} attributes. {n_bad_samples} of "
        f"{len(sampled) * scfg['k']:,} samples were not a number (not counted in the median). "
        f"The largest gain is **{top}** ({g[top]:.2f} → {m[top]:.2f}); its three most frequent greedy "
        f"replies over all {len(test):,} test images ("
        + ", ".join(f"`{r}`" for r in stock.index) + f") are {stock.sum():.0%} of them."))
else:
    print("predict.sample.k is 0: the sampled reading is skipped.")

# %% [markdown]
# ## What the format constraint changed
#
# The same model's plain greedy replies, scored alike, next to the constrained ones above; and every
# reply the constraint changed, with the reply the model would have given without it.

# %%
free = metrics.r2_table(predict.free_readings(pred))
over = pred[pred.overridden]
if shapes is None:
    print("unconstrained run (predict.constrain false): the replies above are the plain greedy ones.")
else:
    both = pd.concat([free.assign(kind="plain greedy"), r2.assign(kind="format-constrained")])
    fig = figures.readout_vs_answers(both)
    plt.show()
    n_free_bad = int(pred.free_pred.isna().sum())
    display(Markdown(
        f"The constraint changed **{len(over)} of {len(pred):,} replies** ({len(over) / len(pred):.2%}). "
        f"Plain greedy: median R² {free.r2.median():.2f}, {int((free.r2 >= 0.70).sum())} attributes "
        f"at 0.70 or more, {n_free_bad} replies not a number; format-constrained: median "
        f"{r2.r2.median():.2f}, {int((r2.r2 >= 0.70).sum())} at 0.70 or more, {n_bad} not a number."))
    if len(over):
        display(over[["isic_id", "attribute", "true", "free_reply", "reply"]]
                .rename(columns={"free_reply": "plain reply", "reply": "constrained reply"})
                .head(30).round(2))

# %% [markdown]
# ## Predicted against measured
#
# One panel per attribute; the diagonal is a perfect reading. Replies far outside the measured range
# are drawn on the panel's edge (as triangles) rather than stretching the axes.

# %%
fig = figures.predicted_vs_true(pred, r2)
plt.show()

# %% [markdown]
# ## The worst readings
#
# For the four attributes with the lowest R², the test images whose reply is furthest from the
# measured value, with both numbers: where the model is wrong, and whether the image explains it.

# %%
worst = metrics.worst_cases(pred, r2.sort_values("r2", na_position="first").attribute.head(4),
                            per_attribute=4)
fig = figures.image_grid(
    [release.image(i) for i in worst.isic_id],
    [f"{r.attribute}\ntrue {r.true:.2f}  " + (f"model {r.pred:.2f}" if r.pred == r.pred else f"reply {r.reply or '—'}")
     for r in worst.itertuples()],
    ncols=8, size=1.7)
plt.show()
