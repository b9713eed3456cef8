"""Do chapter 5's ordering verdicts hold across training seeds? A side study, outside the main job.

    .venv/bin/python probes/seed_study.py --seeds 0 1 [--reuse 0=runs/default]

For each seed, the chain runs on the embedded default with only the training seeds changed
(`train.seed`, `train.tuple_seed`, `model.seed`: the tiny model's initialisation, the tuples drawn
and the batch order), up to the retrieval chapter, in runs/seeds/seed<N>/ (resumable: a rerun
reuses finished stages). `--reuse N=RUN` takes seed N's results from a finished run instead (the
book's own run is seed 0). It then writes probes/results/seed_ordering.csv: per attribute and
comparison, each seed's difference, interval and verdict, and whether the verdicts agree; and
probes/results/seed_r2.csv: each seed's R² per attribute and reading. Chapter 5 reads the first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from skinlib import config, resumable, run as chain

RESULTS = config.seed_ordering_path().parent
UP_TO = "05_retrieval"


def seed_profile(seed: int, folder: Path) -> Path:
    """A profile file that inherits the default and changes only the training seeds."""
    path = folder / f"default-seed{seed}.yaml"
    resumable.write_text(path, yaml.safe_dump({
        "name": f"default-seed{seed}", "inherit": "default",
        "model": {"seed": seed}, "train": {"seed": seed, "tuple_seed": seed}}, sort_keys=False))
    return path


def run_seed(seed: int, root: Path) -> Path:
    out = root / f"seed{seed}"
    stages = list(config.STAGE_NAMES[:config.STAGE_NAMES.index(UP_TO) + 1])
    chain.run_chain(str(seed_profile(seed, root)), out=out, stages=stages)
    return out


def compare(runs: dict[int, Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ordering of every seed side by side with an `agree` column, R² of every seed)."""
    frames, r2 = [], []
    for seed, out in runs.items():
        o = pd.read_csv(resumable.verified(config.ordering_path(out)))
        frames.append(o.set_index(["attribute", "comparison"]).add_suffix(f"_seed{seed}"))
        r2.append(pd.read_csv(resumable.verified(config.r2_readings_path(out))).assign(seed=seed))
    wide = pd.concat(frames, axis=1).reset_index()
    verdicts = wide[[c for c in wide.columns if c.startswith("verdict_")]]
    wide["agree"] = verdicts.nunique(axis=1) == 1
    return wide, pd.concat(r2, ignore_index=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--reuse", nargs="*", default=[], metavar="SEED=RUN",
                    help="take a seed's results from a finished run folder")
    ap.add_argument("--root", default=str(config.REPO_ROOT / "runs" / "seeds"))
    a = ap.parse_args(argv)
    reuse = {int(k): Path(v) for k, v in (r.split("=", 1) for r in a.reuse)}
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    runs = {s: reuse[s] if s in reuse else run_seed(s, root) for s in a.seeds}
    wide, r2 = compare(runs)
    resumable.write_text(config.seed_ordering_path(), wide.to_csv(index=False))
    resumable.write_text(RESULTS / "seed_r2.csv", r2.to_csv(index=False))
    n = len(wide)
    print(f"verdicts agree on {int(wide.agree.sum())} of {n} (attribute, comparison) pairs "
          f"-> {config.seed_ordering_path()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
