"""Fine-tuning on 2 CPU cores: one process on 2 threads vs `accelerate launch` with 2 one-thread
processes (gloo data parallelism), the embedded default's tiny Qwen2-VL.

    .venv/bin/python bench/processes.py [--n 1200] [--epochs 3]

Both run the fine-tuning stage (`skinlib.finetune.run`) on the same phantom, tuples, batch size and
number of optimizer steps (no warm-up, no checkpoints in between), side by side. The row compares
the training loop's own seconds (`train_seconds`); the size column also gives the wall time of the
whole stage, which for the launched run includes starting the processes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from common import append, row, show
from skinlib import config, finetune, phantom, slice3d, split


def stage(cfg: dict, run: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    s = finetune.run(cfg, run, progress=False)
    return s, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1200, help="phantom images (70%% train)")
    ap.add_argument("--epochs", type=float, default=3.0)
    a = ap.parse_args(argv)
    base = config.load_profile("default")
    base["train"].update(epochs=a.epochs, compare_steps=0, vision_warmup={"steps": 0},
                         checkpoint_every=10 ** 6)
    base["threads"] = 2
    with tempfile.TemporaryDirectory() as tmp:
        ph = config.phantom_dir(f"{tmp}/run1")
        phantom.generate(a.n, ph, seed=0, workers=2, progress=False)
        ds = slice3d.Slice3D(*config.release_files(base, f"{tmp}/run1"))
        manifest = split.build_manifest(ds.attribute_frame(), test_fraction=0.3, seed=0)
        results = {}
        for procs in (1, 2):
            run = f"{tmp}/run{procs}"
            if procs > 1:   # the same release files
                config.phantom_dir(run).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(ph, config.phantom_dir(run))
            split.save_manifest(manifest, config.manifest_path(run))
            cfg = {**base, "train": {**base["train"], "processes": procs}}
            config.set_threads(2)   # the one-process run uses both cores, as the chain did before
            results[procs] = stage(cfg, run)
    (s1, w1), (s2, w2) = results[1], results[2]
    assert s2["processes"] == 2 and s1["processes"] == 1 and s1["steps"] == s2["steps"]
    rows = [row("fine-tuning: 1 process x 2 threads vs accelerate launch 2 processes x 1 thread",
                f"tiny Qwen2-VL, {s1['tuples']:,} tuples, {s1['steps']} steps of batch "
                f"{base['train']['batch_size']}, 2 CPU cores (whole stage {w1:.0f} vs {w2:.0f} s)",
                s1["train_seconds"], s2["train_seconds"])]
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
