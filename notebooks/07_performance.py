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
# # Performance: measured side by side
#
# Every speed claim of this project is a ratio of two ways of doing the same work, timed in one run on
# one machine, by a command in `bench/` that appends its rows to `bench/results.csv` (read here; the
# newest row of each benchmark is shown). The second part is this run's own wall time per stage.

# %% tags=["parameters"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>

# %%
import json

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from skinlib import config

cfg = config.load_profile(profile)
run = config.run_dir(cfg, out)
results = config.REPO_ROOT / "bench" / "results.csv"
bench = pd.read_csv(results) if results.exists() else pd.DataFrame()
print(f"{len(bench)} rows in {results.relative_to(config.REPO_ROOT)}")

# %% [markdown]
# ## The benchmarks
#
# `ratio` = baseline seconds / our seconds (above 1: ours is faster). Commands:
# `bench/extraction.py` (17 embeddings per image: prefix-shared vs full forwards),
# `bench/percentile.py` (evaluation at the paper's sizes: binary search vs a scan),
# `bench/search.py` (faiss vs numpy, compressed vs flat), `bench/training.py` (packed vs one tuple per
# sequence), `bench/main_job.py` (the book command per stage).

# %%
if len(bench):
    latest = bench.groupby("benchmark", sort=False).tail(1)
    with pd.option_context("display.max_colwidth", 120):
        display(latest[["benchmark", "size", "baseline_s", "ours_s", "ratio", "date"]].reset_index(drop=True))
    print("machine:", latest.machine.iloc[-1])
else:
    print("no benchmark has been run yet: see bench/")

# %% [markdown]
# ## This run, stage by stage

# %%
rows = []
for stage in config.STAGE_NAMES:
    stamp = config.stage_dir(run, stage) / ".stage.json"
    if stamp.exists():
        rows.append({"stage": stage, "seconds": json.loads(stamp.read_text())["seconds"]})
stages = pd.DataFrame(rows)
if len(stages):
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(stages) + 1))
    ax.barh(stages.stage, stages.seconds, color="C0")
    ax.invert_yaxis()
    ax.set(xlabel="seconds (this run; a stage reused from cache shows the run that made it)")
    fig.tight_layout()
    plt.show()
    print(f"total of the stages above: {stages.seconds.sum() / 60:.1f} min (goal for the whole book: 15 min)")
