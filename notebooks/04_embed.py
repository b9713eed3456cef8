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
# # Embeddings: what the fine-tuned model's last layer holds
#
# The paper (§3.3) reads two kinds of vectors off the last decoder layer: h_im(I), the mean over the
# image tokens of the image alone, and h_im,a(I), the state at the final token of [image, Q(a)] — the
# state from which the model is about to answer question a. This chapter extracts both for every
# training image (the retrieval database) and every query image, plus the two baselines' vectors.

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
# Overrides of the profile's `embed` section; None keeps the profile's value.
n_queries = None
batch_size = None

# %% tags=["hide-input"]
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from skinlib import (chapter, config, embed, figures, metrics, model as models, qa,
                     resumable, study, tuples)

ch = chapter.open(profile, out, "04_embed",
                  embed={"n_queries": n_queries, "batch_size": batch_size})
cfg, run, ecfg = ch.cfg, ch.run, ch.cfg["embed"]
manifest, release = ch.manifest, ch.release
db = ch.train
q = study.queries(manifest, ecfg["n_queries"], cfg["seed"])
config.queries_path(run).parent.mkdir(parents=True, exist_ok=True)
q[["isic_id"]].to_csv(config.queries_path(run), index=False)
print(f"database: {len(db):,} training images; queries: {len(q):,} test images")

# %% [markdown]
# ## Fast and exact
#
# The 16 questions of an image share everything up to the question text, so the model runs that
# prefix (system prompt and image) once, keeps its key–value cache, and answers all 16 question
# suffixes from it in one batch: one vision pass per image instead of 17. Qwen2-VL's 3-D rotary
# positions make this subtle (the text after an image does not sit at its index), so the suffixes get
# the positions the full forward would give them; the tests compare both ways for every attribute.
# Below, the same check on a few of this run's images, and the time per image both ways.

# %% tags=["hide-input"]
tuned = models.load_finetuned(config.finetuned_dir(run), device=models.default_device())
images = qa.ImageCache(release, tuned.image_processor, keep=False)
some = [images[i] for i in q.isic_id[:4]]
model = (tuned.model, tuned.tokenizer, tuned.image_processor)
t0 = time.perf_counter()
fast = embed.embed(*model, some)
t_fast = (time.perf_counter() - t0) / len(some)
t0 = time.perf_counter()
slow = embed.embed_slow(*model, some)
t_slow = (time.perf_counter() - t0) / len(some)
diff = max(float((fast[k] - slow[k]).abs().max()) for k in fast)
print(f"largest difference fast vs full forward, h_im and all 16 h_im,a: {diff:.1e}\n"
      f"per image, all 17 vectors: prefix-shared {t_fast * 1e3:.0f} ms, "
      f"full forwards {t_slow * 1e3:.0f} ms ({t_slow / t_fast:.1f}x)")
# one model on the device at a time: this copy goes before extract_all loads its own
del tuned, model, images, some
study.free_memory()

# %% [markdown]
# ## Extract
#
# Vectors are written in float16 shards as they come (a progress bar per extraction); an interrupted
# extraction resumes without recomputing finished shards, and memory stays at one shard whatever the
# database size. One model is on the device at a time: the check above drops its copy, and the
# extraction loads the fine-tuned model for its vectors, then the untuned one in its place (for
# the 7B, 16.6 GB of weights rather than three copies).

# %% tags=["hide-input"]
timings = study.extract_all(cfg, run, list(db.isic_id), list(q.isic_id))
print(f"multi-attribute question (f): {embed.multi_question(ecfg['multi'])!r}")

# %% [markdown]
# ## The baseline image encoder (method e)
#
# The paper compares with MONET, a CLIP image encoder fine-tuned on dermatology image–text pairs,
# which knows skin images but was never told the 16 attributes. The `paper` profile loads MONET from
# the hub; the embedded default cannot download it, so it trains a stand-in with the same two
# properties: an image encoder of its own (a small CNN), trained on this run's training images by
# contrastive learning (two augmented views of an image should agree), without any attribute label.

# %% tags=["hide-input"]
t0 = time.perf_counter()
enc = study.baseline_encoder(cfg, run, release, db.isic_id)
# MONET is loaded from the hub, the stand-in trained (or loaded: this run trained it)
monet = cfg["embed"]["encoder"].get("kind") == "monet"
encoder_step = "encoder_load" if monet else "encoder_train_or_load"
timings[encoder_step] = time.perf_counter() - t0
print(f"encoder: {enc.name}, {enc.dim}-dimensional")
for part, ids in (("db", db.isic_id), ("queries", q.isic_id)):
    t0 = time.perf_counter()
    vec = enc.embed([release.image(i) for i in ids], batch_size=64)
    study.save_array(run, f"encoder_{part}", vec)
    timings[f"encoder_{part}"] = time.perf_counter() - t0

# %% tags=["hide-input"]
# An extraction found finished (by `accelerate launch -m skinlib.study`, or by an
# earlier run of this notebook) has no time here: marked, not shown as 0 ms per image.
tm = pd.Series(timings, name="seconds").round(1).to_frame()
tm["images"] = [len(q) if k.endswith("queries") else len(db) for k in tm.index]
tm["ms per image"] = (1e3 * tm.seconds / tm.images).round(1)
tm["done"] = ["found finished" if pd.isna(v) else "here" for v in tm.seconds]
display(tm)

# %% [markdown]
# ## A map of h_im
#
# The fine-tuned image-only vectors of the database, projected on their first two principal
# components and coloured by four attributes. Colour running smoothly across the map means the
# attribute is laid out along the embedding's main directions — the grounding the paper is after.

# %% tags=["hide-input"]
# bounded memory at the paper's size: h_im whole (one vector per image), the 16 h_im,a
# read from their shards one attribute at a time (study.PerAttribute)
stored_db = study.open_vectors(run, "tuned_db")
ids_db = list(stored_db.ids)
image_db = study.Column(stored_db, "image").read(dtype=np.float32)
xy = study.pca2(image_db)
vals = db.set_index("isic_id").loc[ids_db]
fig = figures.embedding_map(xy, vals, ["areaMM2", "deltaL", "Bext", "norm_border"])
plt.show()

# %% [markdown]
# ## What the last layer holds, and what the model answers
#
# {doc}`Chapter 3 <03_predict>` scores the model's answers, read as the profile's headline reading says (the median of
# the answer distribution on the embedded default; greedy replies, as the paper, on `paper`). The
# vectors can be scored as well: a ridge regression fitted on the database vectors (training
# images) and scored on the
# query images gives the share of each attribute that a *linear* read-out of the last layer holds
# — of h_im,a (the attribute's own question) and of h_im. Where the read-out beats the answers, the
# language model's digits lose what its last layer holds; where all three are low, the image
# features never held the attribute.

# %% tags=["hide-input"]
stored_q = study.open_vectors(run, "tuned_queries")
ids_q = list(stored_q.ids)
image_q = study.Column(stored_q, "image").read(dtype=np.float32)
q_vals = q.set_index("isic_id").loc[ids_q]
read = metrics.readout_table(
    {"image_text": study.PerAttribute(stored_db), "image": image_db}, vals,
    {"image_text": study.PerAttribute(stored_q), "image": image_q}, q_vals)
answered = pd.read_csv(resumable.verified(config.r2_path(run)))
answers = answered[["attribute", "r2"]].assign(kind="answers")
table = pd.concat([answers, read[["attribute", "kind", "r2"]]], ignore_index=True)
fig = figures.readout_vs_answers(table, labels={
    "answers": f"answers ({answered.reading.iloc[0]} reading, chapter 3)",
    "image_text": "read-out of h_im,a", "image": "read-out of h_im"})
plt.show()
med = table.groupby("kind").r2.median()
print(f"median R² over the 16 attributes: answers {med['answers']:.2f}, "
      f"read-out of h_im,a {med['image_text']:.2f}, of h_im {med['image']:.2f}")

# %% [markdown]
# The read-out above learns every attribute from every training image, while the language model was
# taught each attribute only on the training images whose tuples asked it (W of 16 per image). Fitted
# on those images alone, the read-out of h_im shows whether that smaller set of answers is what holds
# the replies back.

# %% tags=["hide-input"]
asked = tuples.asked_rows(pd.read_parquet(config.tuples_path(run)), ids_db)
taught = metrics.readout_table({"image": image_db}, vals, {"image": image_q},
                               q_vals, fit_rows=asked)
print(f"read-out of h_im fitted on the images that asked each attribute "
      f"({taught.n_train.min():,} to {taught.n_train.max():,} per attribute, "
      f"of {len(ids_db):,}): median R² {taught.r2.median():.2f}, "
      f"against {med['image']:.2f} fitted on all; the answers: {med['answers']:.2f}")
