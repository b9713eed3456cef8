"""Chapter 3's prediction on 2 CPU cores: one process on 2 threads vs `accelerate launch` with 2
one-thread processes, each computing its share of the shards (`skinlib.predict`'s entry point).

    make book && .venv/bin/python bench/predict_processes.py [--run runs/default] [--n-images 100]

Both predict the first `--n-images` test images of a finished run (every question, every reading
the profile scores) with its fine-tuned model, into fresh copies of the run's folders (the model,
tuples and data are linked, not copied), side by side; the launched run's wall time includes
starting both processes and loading the model in each. The row counts the replies in which the
two differ (one thread sums in another order than two: a near tie can go either way).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import append, row, show
from skinlib import config, finetune, predict


def scratch_run(run: Path, dest: Path) -> Path:
    """A run folder that shares `run`'s data, split and model but holds no prediction."""
    for stage in ("01_data", "02_finetune"):
        (dest / stage).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(run.resolve() / stage, dest / stage)
    return dest.resolve()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(config.REPO_ROOT / "runs" / "default"))
    ap.add_argument("--profile", default="default")
    ap.add_argument("--n-images", type=int, default=100)
    a = ap.parse_args(argv)
    run = Path(a.run)
    if not config.finetuned_dir(run).exists():
        print(f"error: {config.finetuned_dir(run)} missing: run `make book` first", file=sys.stderr)
        return 1
    cfg = config.load_profile(a.profile)
    cfg["predict"]["n_images"] = a.n_images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prof = tmp / "profile.yaml"
        prof.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "inherit"}, sort_keys=False))
        one, two = scratch_run(run, tmp / "one"), scratch_run(run, tmp / "two")
        config.set_threads(2)
        t0 = time.perf_counter()
        frames = predict.stage_predictions(cfg, one, progress=False)
        one_s = time.perf_counter() - t0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = finetune.launch_command(2, ["-m", "skinlib.predict", "--profile", str(prof), "--out", str(two),
                                          "--quiet"])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        two_s = time.perf_counter() - t0
        # the launched shards, merged in this process (a finished job: nothing is recomputed)
        merged = predict.stage_predictions(cfg, two, progress=False)
        # the same questions in the same order; replies compared, the in-shape probability to rounding
        # (two threads sum in another order than one)
        differ, drift = 0, 0.0
        for k, f in frames.items():
            x, y = f.reset_index(drop=True), merged[k].reset_index(drop=True)
            if not x[["isic_id", "attribute"]].equals(y[["isic_id", "attribute"]]):
                raise RuntimeError(f"{k}: the two runs asked other questions")
            # a near tie between two tokens can go either way when 2 threads sum in another order
            differ += int((x.reply != y.reply).sum())
            if "in_shape" in x:
                drift = max(drift, float((x.in_shape - y.in_shape).abs().max()))
        rows_n = sum(len(f) for f in frames.values())
    rows = [row("prediction: 1 process x 2 threads vs accelerate launch 2 processes x 1 thread",
                f"{a.n_images} test images x 16 questions, readings {', '.join(frames)} ({rows_n:,} replies), "
                f"tiny Qwen2-VL of {run.name}; launched wall time includes starting both processes; "
                f"{differ:,} replies differ (float rounding: 2 threads sum in another order than 1; "
                f"in-shape probability within {drift:.0e})",
                one_s, two_s)]
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
