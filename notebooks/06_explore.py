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
# Pick a query lesion (a test image, or upload your own crop), a retrieval method (a)–(f), an
# attribute and k: the query is shown with its measured value and the fine-tuned model's answer to
# the attribute's question, and beside it the top-k database lesions, each with its value and its
# percentile (paper §4.2; lower = closer to the query than most of the database).
#
# **Live version** (needs a finished run of the chain): `jupyter lab notebooks/06_explore.py` (the
# `.py` opens as a notebook through jupytext). In this static page there is no kernel, so below the
# live controls a small set of precomputed picks can be chosen from the list.

# %% tags=["parameters"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>
n_static = 6  # precomputed picks for the static page
live = True  # build the ipywidgets controls (the book's batch run passes False: no frontend there)

# %%
import time

import matplotlib.pyplot as plt
from IPython.display import HTML, display

from skinlib import config, explore, study

cfg = config.load_profile(profile)
run = config.run_dir(cfg, out)
config.set_threads(cfg.get("threads", 1))
t0 = time.perf_counter()
ex = explore.Explorer(cfg, run)
print(f"explorer ready in {time.perf_counter() - t0:.1f} s: {len(ex.q_ids):,} queries, "
      f"{len(ex.db_ids):,} database images")

# %% [markdown]
# ## Live controls (in Jupyter)
#
# In this static page the controls are not built (no kernel could answer them); open the notebook
# in Jupyter to use them.

# %%
if live:
    controls = explore.Controls(ex)
    display(controls.widget)
    controls.show()
else:
    print("static page: the live controls are built when the notebook runs in Jupyter (live=True)")

# %% [markdown]
# ## How fast is a pick?
#
# The time of one pick (search, percentiles, the model's answer, drawing) for each method, on this
# machine.

# %%
import pandas as pd

times = []
for m in explore.METHODS:
    t = time.perf_counter()
    fig, _ = explore.panel(ex, ex.q_ids[0], m, "areaMM2", 5)
    plt.close(fig)
    times.append({"method": study.LABELS[m], "seconds per pick": round(time.perf_counter() - t, 3)})
display(pd.DataFrame(times))

# %% [markdown]
# ## Precomputed picks (works without a kernel)

# %%
picks = study.example_queries(ex.values.loc[ex.q_ids].reset_index(), "areaMM2", n=max(1, n_static // 2),
                              seed=cfg["seed"])
choices = [(q, m, a) for q in picks for m, a in (("image_text", "areaMM2"), ("image", "areaMM2"))][:n_static]
display(HTML(explore.static_page(ex, choices)))
