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

# %% tags=["parameters", "hide-input"]
profile = "default"  # profile name or path to a profile YAML
out = None  # run folder; default runs/<profile>

# %% tags=["hide-input"]
import json

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from skinlib import chapter, config, figures

GOAL_S = 600   # the main job's goal on two cores (bench/main_job.py)

ch = chapter.open(profile, out, "08_performance")
run = ch.run
results = config.REPO_ROOT / "bench" / "results.csv"
bench = pd.read_csv(results) if results.exists() else pd.DataFrame()
print(f"{len(bench)} rows in {config.shown(results)}")

# %% [markdown]
# ## The benchmarks
#
# `ratio` = baseline seconds / our seconds (above 1: ours is faster). Commands:
# `bench/extraction.py` (17 embeddings per image: prefix-shared vs full forwards),
# `bench/percentile.py` (evaluation at the paper's sizes: binary search vs a scan),
# `bench/search.py` (faiss vs numpy, compressed vs flat), `bench/training.py` (packed vs one tuple per
# sequence), `bench/processes.py` (two one-thread training processes vs one on two threads),
# `bench/main_job.py` (the book command per stage, against the 10-minute goal),
# `bench/scale.py` (extraction and evaluation at N = 50,000 vs 5,000: peak memory and time).
# Run any of them with `.venv/bin/python bench/<name>.py`.

# %% tags=["hide-input"]
if len(bench):
    fig = figures.benchmark_ratios(bench)
    plt.show()
else:
    print("no benchmark has been run yet: see bench/")

# %% [markdown]
# The sizes behind each bar (the problem size, memory and recall where they apply) and the machine:

# %% tags=["hide-input"]
if len(bench):
    latest = bench.groupby("benchmark", sort=False).tail(1)
    shown = latest[["benchmark", "size", "baseline_s", "ours_s", "ratio"]]
    with pd.option_context("display.max_colwidth", 200):
        display(shown.reset_index(drop=True))
    print("machine:", latest.machine.iloc[-1],
          "| dates:", ", ".join(sorted(set(latest.date))))

# %% [markdown]
# ## This run, stage by stage
#
# Each stage's wall time in this run, from the stamps `skinlib.run` writes, with its share of the
# whole; the goal for the book command on two cores is ten minutes.

# %% tags=["hide-input"]
rows = []
for stage in config.STAGE_NAMES:
    stamp = config.stage_stamp_path(run, stage)
    if stamp.exists():
        seconds = json.loads(stamp.read_text())["seconds"]
        rows.append({"stage": stage, "seconds": seconds})
stages = pd.DataFrame(rows)
if len(stages):
    fig = figures.stage_shares(stages, goal_s=GOAL_S)
    plt.show()
    total = stages.seconds.sum()
    print(f"total of the stages above: {total / 60:.1f} min "
          f"(goal: {GOAL_S / 60:.0f} min)")
