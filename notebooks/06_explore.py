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
import io
import time

import matplotlib.pyplot as plt
from IPython.display import HTML, display
from PIL import Image

from skinlib import attributes, config, explore, study

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
import ipywidgets as W

if live:
    query_w = W.Dropdown(options=ex.q_ids[:200], description="query")
    upload_w = W.FileUpload(accept="image/*", multiple=False, description="or upload")
    method_w = W.Dropdown(options=[(study.LABELS[m], m) for m in explore.METHODS], value="image_text",
                          description="method")
    attr_w = W.Dropdown(options=list(attributes.NAMES), value="areaMM2", description="attribute")
    k_w = W.IntSlider(value=5, min=1, max=10, description="k")
    out_w = W.Output()

    def show(*_):
        with out_w:
            out_w.clear_output(wait=True)
            t = time.perf_counter()
            if upload_w.value:  # an uploaded image wins over the query list until it is cleared
                item = upload_w.value[0]
                image = Image.open(io.BytesIO(item["content"])).convert("RGB")
                top = ex.search(image, method_w.value, attr_w.value, k_w.value)
                print(f"uploaded {item['name']}: the model says {attr_w.value} = {ex.ask(image, attr_w.value)}")
                display(top)
            else:
                fig, _ = explore.panel(ex, query_w.value, method_w.value, attr_w.value, k_w.value)
                plt.show()
            print(f"({time.perf_counter() - t:.2f} s)")

    for w in (query_w, upload_w, method_w, attr_w, k_w):
        w.observe(show, names="value")
    display(W.VBox([W.HBox([query_w, upload_w]), W.HBox([method_w, attr_w, k_w]), out_w]))
    show()
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
