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
# # Retrieval: finding lesions like this one, in the attribute you ask about (Fig. 3, Fig. 4)
#
# Each query (a test image) retrieves its top-k training images by cosine similarity. A retrieved
# image is scored per attribute by how close its value is to the query's, as a percentile among all
# training images (paper §4.2): 0 = closer than any other image in the database, 50 = no better than
# chance. The paper's claim is an ordering: asking the attribute's question (image+text) retrieves
# images closer in that attribute than the image alone, which beats the untuned model and a general
# skin-image encoder.

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
# Overrides of the profile's `retrieval` section; None keeps the profile's value.
k = None
b = None

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from skinlib import chapter, config, figures, intervals, percentiles, resumable, study

ch = chapter.open(profile, out, "05_retrieval", retrieval={"k": k, "b": b})
cfg, run, rcfg = ch.cfg, ch.run, ch.cfg["retrieval"]
manifest, release = ch.manifest, ch.release

# The image+text vectors stay in their float16 shards: run_methods reads one attribute
# at a time (16 attributes of 3,584 floats per image do not fit in memory at the paper's
# size).
db_ids, q_ids, vec = study.stored_vectors(run)
q_frame = manifest.set_index("isic_id").loc[q_ids].reset_index()
db_frame = ch.train.set_index("isic_id").loc[db_ids].reset_index()
multi = list(cfg["embed"]["multi"])
# intervals resample patients, not lesions
patient_of = manifest.set_index("isic_id").patient_id
print(f"{len(q_ids):,} queries against {len(db_ids):,} database images; "
      f"k = {rcfg['k']}, b = {rcfg['b']}")

# %% [markdown]
# ## Search with every method
#
# The hierarchical method (b) needs no per-attribute index: it takes the top b images by the
# image-only vector and re-ranks them by their image+text vectors. In the paper those are computed
# on the fly for the candidates; here every database image's h_im,a was already extracted
# ({doc}`chapter 4 <04_embed>`, the same prefix-shared forward), so the candidates' stored vectors
# are read instead of being computed again.

# %% tags=["hide-input"]
results, cost = study.run_methods(db_ids, q_ids, vec, k=rcfg["k"], b=rcfg["b"],
                                  multi_names=multi)
long = study.score(results, db_frame, q_frame)
# written whole and sealed, so chapter 7 and the side studies can tell them unaltered
job = resumable.job_key({"retrieval": rcfg, "queries": q_ids, "database": db_ids})
scored = config.percentiles_path(run)
scored.parent.mkdir(parents=True, exist_ok=True)
long.to_parquet(resumable.partial_path(scored), index=False)
resumable.commit(scored, job, rows=len(long))
summary = intervals.summary_with_intervals(percentiles.summary(long), long, patient_of,
                                           seed=cfg["seed"])
config.metrics_dir(run).mkdir(parents=True, exist_ok=True)
resumable.write_csv(summary, config.retrieval_path(run), job)
print(f"{len(long):,} scored cells -> {scored.relative_to(run)}\n"
      f"medians -> {config.retrieval_path(run).relative_to(run)}")
missing = percentiles.missing_cells(long)
if missing.n_nan.sum():
    print(f"{int(missing.n_nan.sum())} cells have no value (an excluded attribute "
          "of the query or the retrieved image) and are not scored:")
    display(missing[missing.n_nan > 0])

# %% [markdown]
# ## Fig. 4: how close in each attribute are the top-5?
#
# One panel per attribute, one box per method (percentiles of every query's top-5; lower is better;
# the dashed line is chance).

# %% tags=["hide-input"]
paper_long = long[long.method.isin(study.PAPER_METHODS) & long.percentile.notna()]
fig = figures.percentile_boxes(paper_long, order=list(study.PAPER_METHODS),
                               labels=study.LABELS)
plt.show()

# %% [markdown]
# ## How firm is the ordering?
#
# A median over a few hundred queries moves with the queries drawn, and lesions of one patient are
# not independent. Each comparison of the paper's ordering is therefore made on the same bootstrap
# resamples of test *patients* (`skinlib.intervals`): the difference of the two methods' median
# percentiles, with its 95% interval. A verdict *holds* when the whole interval lies on the paper's
# side of zero (for "hierarchical ≈ image+text": within 2 points), is *reversed* when it lies wholly
# on the other side, and is *not separable* when it straddles.

# %% tags=["hide-input"]
order_table = intervals.ordering(long, patient_of, seed=cfg["seed"])
resumable.write_csv(order_table, config.ordering_path(run), job)
fig = figures.ordering_differences(order_table, labels=intervals.COMPARISON_LABELS)
plt.show()
display(Markdown(
    "**The paper** (Fig. 4, real SLICE-3D, Qwen2-VL-7B): image+text retrieval "
    "gives the lowest percentiles for every attribute, hierarchical is close to it, "
    "then image-only, then the untuned model and MONET. **This run**: "
    + intervals.ordering_sentence(order_table)))

# %% [markdown]
# **Across training seeds.** The same verdicts from a second fine-tuning of the embedded default
# that changes only the training seeds (model initialisation, tuples drawn, batch order): a side
# study outside the main job, `python probes/seed_study.py --seeds 0 1 --reuse 0=runs/default`,
# which writes `probes/results/seed_ordering.csv`. Its seed 0 is the book's own run of the commit
# that wrote the file.

# %% tags=["hide-input"]
seed_csv = config.seed_ordering_path()
if cfg["name"] == "default" and seed_csv.exists():
    display(Markdown(intervals.seed_agreement_sentence(pd.read_csv(seed_csv))))
else:
    print(f"no seed study for the {cfg['name']!r} profile "
          f"({config.shown(seed_csv)} holds the embedded default's)")

# %% [markdown]
# ## Fig. 3: what the two kinds of retrieval return
#
# Four test queries (left) with their top-5 by the image alone (top row of each pair) and by the image
# plus the area question (bottom row); the lesion area in mm² is printed above every image.

# %% tags=["hide-input"]
pick = study.example_queries(q_frame, "areaMM2", n=4, seed=cfg["seed"])
rows, captions = [], []
qpos = {i: n for n, i in enumerate(q_ids)}
area = q_frame.set_index("isic_id").areaMM2
dbarea = db_frame.set_index("isic_id").areaMM2
for qid in pick:
    for method in ("image", "image_text"):
        key = (method, None if method == "image" else "areaMM2")
        top = results[key][qpos[qid]]
        rows += [release.image(qid)] + [release.image(i) for i in top]
        label = "image only" if method == "image" else "image + Q(area)"
        captions += ([f"query\n{label}\n{area[qid]:.1f} mm²"]
                     + [f"{dbarea[i]:.1f} mm²" for i in top])
fig = figures.image_grid(rows, captions, ncols=rcfg["k"] + 1)
plt.show()

# %% tags=["hide-input"]
gaps = study.value_gaps(results, db_frame, q_frame, q_ids, "areaMM2")
display(Markdown(
    "**The paper** (Fig. 3, real SLICE-3D, Qwen2-VL-7B): with the area question the "
    "top-5 have areas close to the query's, while the image alone returns look-alikes "
    "of other sizes. **This run**: "
    + study.fig3_sentence(gaps, "areaMM2", k=rcfg["k"])))

# %% [markdown]
# ## Beyond the paper
#
# **(f) Several attributes in one question.** The paper names this as its next step: one question
# about several attributes, final token. Below, its median percentile on the attributes it asks
# about, next to asking each attribute alone (a) and the image alone (c).
#
# **Compressed per-attribute indexes.** Method (a) needs one database of vectors per attribute — 16
# times the image-only database. The paper's answer is the hierarchical search (b); a second answer
# is to compress the 16 indexes (8-bit scalar quantisation: a quarter of the memory).

# %% tags=["hide-input"]
med = summary.pivot(index="attribute", columns="method", values="median_percentile")
shown = [m for m in ("multi_attribute", "image_text", "image") if m in med]
display(med.loc[multi, shown].round(1))
table = study.cost_table(cost, summary, n_queries=len(q_ids))
display(table)
