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
# # Explore the retrievals yourself
#
# Pick a query lesion, a retrieval method (a)–(f), an attribute and k: the query is shown with its
# measured value and the fine-tuned model's answer to the attribute's question, and beside it the
# top-k database lesions, each with its value and its percentile (paper §4.2; lower = closer to the
# query than most of the database). Next to them, the malignancy probe of {doc}`06_malignancy`
# applied to the 16 attributes the model reads in the query: its probability of malignancy, each
# attribute's contribution (standardised value × coefficient; with the intercept they sum to the
# log-odds) and, for a test lesion, its label. A run whose {doc}`chapter 6 <06_malignancy>` kept no
# probe says so instead.
#
# **In this page** (no kernel) the explorer at the end of the page works from picks precomputed
# when the book was built: a few dozen test lesions, every method and attribute, k from 1 to 10.
#
# **Live** (any test lesion, or your own crop): after `make book`, install JupyterLab once with
# `.venv/bin/pip install -e '.[live]'` and run `.venv/bin/python -m skinlib.explore`. It opens a
# fresh notebook copy of this chapter in the ignored folder `live/` (so exploring never changes the
# repository's files); Run All, then use the controls.

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
n_static = 40  # test lesions in the book's kernel-free explorer
live = True  # build the ipywidgets controls (the book's batch run passes False)

# %% tags=["hide-input"]
import time

import pandas as pd
from IPython.display import HTML, display

from skinlib import chapter, explore, study

ch = chapter.open(profile, out, "07_explore")
cfg, run = ch.cfg, ch.run
t0 = time.perf_counter()
ex = explore.Explorer(cfg, run)
print(f"explorer ready in {time.perf_counter() - t0:.1f} s: {len(ex.q_ids):,} queries, "
      f"{len(ex.db_ids):,} database images")

# %% [markdown]
# ## Live controls (in Jupyter)
#
# Pick a query from the list (all the run's test queries) or upload a crop; picking a query again,
# or "clear upload", drops the upload. An upload has no measured value, so its results carry no
# percentile, and no label; the probe reads its 16 attributes the same way. The model is asked all
# 16 questions once per query or upload, so the first pick of a query takes longer than a change
# of method, attribute or k. In the book the controls are not built (no kernel could answer them).

# %% tags=["hide-input"]
if live:
    controls = explore.Controls(ex)
    display(controls.widget)
    controls.show()
else:
    print("book: the live controls are built when the notebook runs in Jupyter "
          "(live=True)")

# %% [markdown]
# ## How fast is a pick?
#
# One pick is the search, the percentiles, the model's answer and the thumbnails. A method's first
# pick also builds its index over the database from the stored vectors; later picks reuse it. The
# explorer reads only what it shows: a query's own vectors are read from the shards when it is
# picked, and of method (a)'s per-attribute indexes only the last attribute's is kept (at the
# paper's size each is 4 GB), so a change of attribute rebuilds it. `explore.RunVectors` says
# what it holds at the paper's size.

# %% tags=["hide-input"]
times = []
for m in explore.METHODS:
    spent = []
    for q in ex.q_ids[:2]:  # the first pick builds the index, the second one reuses it
        t = time.perf_counter()
        explore.grid_html(ex, explore.pick(ex, q, m, "areaMM2", 5))
        spent.append(time.perf_counter() - t)
    times.append({"method": study.LABELS[m],
                  "first pick, s (builds the index)": round(spent[0], 3),
                  "a later pick, s": round(spent[1], 3)})
display(pd.DataFrame(times))

# %% [markdown]
# ## The explorer without a kernel
#
# Every combination below was computed by the same `Explorer` when the book was built, and is read
# from the page's own files (no network), the malignancy panel of each query included.

# %% tags=["hide-input"]
if live:
    print("live: the book's precomputed explorer is written by the book's batch run "
          "(live=False)")
else:
    t = time.perf_counter()
    picks = explore.static_queries(ex, n_static, cfg["seed"])
    written = explore.write_static(ex, explore.static_dir(run), picks)
    print(f"precomputed {written['queries']} queries, "
          f"{written['images']:,} thumbnails, "
          f"{written['bytes'] / 1e6:.2f} MB in {time.perf_counter() - t:.1f} s")
    display(HTML(explore.static_page(written)))
