"""The main job's wall time per stage: the README's book command on the embedded default.

    make book && .venv/bin/python bench/main_job.py [--run runs/default]

Reads the seconds each stage took from the run's stage stamps (written by `skinlib.run` as it
went) and the book build time if given; one row: the total against the 10-minute goal (baseline_s =
the goal, ours_s = measured, ratio > 1: within the goal), each stage's seconds and share in its size
column. A stage reused from cache
took no time in that run: rerun with `make book` after `rm -rf runs/default` for a full measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import append, row, show
from skinlib import config

GOAL_S = 10 * 60


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(config.REPO_ROOT / "runs" / "default"))
    ap.add_argument("--book-seconds", type=float, default=None, help="time of `python -m skinlib.book`")
    a = ap.parse_args(argv)
    run = Path(a.run)
    secs = {}
    for stage in config.STAGE_NAMES:
        stamp = config.stage_stamp_path(run, stage)
        if not stamp.exists():
            print(f"error: {stamp} missing: run `make book` first", file=sys.stderr)
            return 1
        secs[stage] = float(json.loads(stamp.read_text())["seconds"])
    if a.book_seconds:
        secs["book build"] = a.book_seconds
    total = sum(secs.values())
    shares = ", ".join(f"{name.split('_')[0] if name[0].isdigit() else name} {s:.0f} s ({s / total:.0%})"
                       for name, s in secs.items())
    for name, s in secs.items():
        print(f"{name:<16} {s:8.1f} s  {s / total:6.1%}")
    rows = [row("main job: make book on the embedded default vs the 10-minute goal (ratio > 1 = within)",
                f"{run.name}: {shares}", GOAL_S, total)]
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
