"""Bounded memory at scale: streaming extraction and percentile evaluation over a phantom release
of N images (default 50,000) against the same at N/10, peak RSS of each in its own process.

    .venv/bin/python bench/scale.py [--n 50000] [--data data/phantom-50k]

Extraction: `skinlib.embed.extract` of h_im for every image, read one by one from the release's
HDF5 file (`qa.ImageCache(keep=False)`), written in 256-image shards, with the embedded default's
tiny Qwen2-VL. Evaluation: `skinlib.percentiles.percentile_frame` for N/10 queries x 5 retrieved against
all N database values, 16 attributes. Each child process reports its wall time and its peak RSS
(getrusage ru_maxrss). The row compares the N run's time with 10x the N/10 run's (ratio ~1: linear
time); its size column gives both peak RSS figures: memory that does not grow with N stays flat.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import append, row, show

REPO = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_extract(data: Path, n: int) -> dict:
    import torch

    from skinlib import embed, model as models, qa, slice3d
    torch.set_num_threads(2)
    release = slice3d.Slice3D(data / "train-image.hdf5", data / "train-metadata.csv")
    ids = release.ids[:n]
    with tempfile.TemporaryDirectory() as tmp:
        loaded = models.load(models.build_tiny(f"{tmp}/tiny"))
        images = qa.ImageCache(release, loaded.image_processor, keep=False)
        base = peak_mb()
        t = time.perf_counter()
        embed.extract(loaded.model, loaded.tokenizer, loaded.image_processor, images, ids, f"{tmp}/emb",
                      kinds=("image",), shard_size=256, batch_size=32, progress=False)
        return {"seconds": time.perf_counter() - t, "peak_mb": peak_mb(), "before_mb": base, "n": len(ids)}


def child_evaluate(data: Path, n: int) -> dict:
    import numpy as np
    import pandas as pd

    from skinlib import attributes, percentiles
    frame = pd.read_csv(data / "train-metadata.csv", usecols=["isic_id", *attributes.COLUMNS])
    frame = frame.rename(columns={a.column: a.name for a in attributes.ATTRIBUTES}).iloc[:n]
    rng = np.random.default_rng(0)
    q = frame.sample(max(1, n // 10), random_state=0)
    top = rng.choice(frame.isic_id.to_numpy(), size=(len(q), 5))
    base = peak_mb()
    t = time.perf_counter()
    out = percentiles.percentile_frame(frame, q, top)
    return {"seconds": time.perf_counter() - t, "peak_mb": peak_mb(), "before_mb": base, "n": n,
            "cells": len(out)}


def measure(kind: str, data: Path, n: int) -> dict:
    """Run one child in a fresh process (so its peak RSS is its own)."""
    r = subprocess.run([sys.executable, __file__, "--child", kind, "--data", str(data), "--n", str(n)],
                       check=True, capture_output=True, text=True, cwd=Path(__file__).parent)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--data", default=None, help="phantom folder (made if missing; default data/phantom-<n>)")
    ap.add_argument("--child", choices=("extract", "evaluate"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    data = Path(a.data or REPO / "data" / f"phantom-{a.n}")
    if a.child:
        print(json.dumps((child_extract if a.child == "extract" else child_evaluate)(data, a.n)))
        return 0
    if not (data / "train-metadata.csv").exists():
        from skinlib import phantom
        t = time.perf_counter()
        print(f"generating a {a.n:,}-image phantom in {data} ...", flush=True)
        phantom.generate(a.n, data, seed=0, workers=2)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    size_mb = (data / "train-image.hdf5").stat().st_size / 2 ** 20
    rows = []
    for kind, what in (("extract", "streaming extraction of h_im (tiny Qwen2-VL, shards of 256)"),
                       ("evaluate", "percentile evaluation, N/10 queries x 5 against N values, 16 attributes")):
        small, big = measure(kind, data, a.n // 10), measure(kind, data, a.n)
        print(kind, small, big, flush=True)
        rows.append(row(f"scale: {what}, N={big['n']:,} vs 10 x N={small['n']:,}",
                        f"phantom HDF5 {size_mb:.0f} MB; peak RSS {small['peak_mb']:.0f} MB at N={small['n']:,}, "
                        f"{big['peak_mb']:.0f} MB at N={big['n']:,} (seconds: baseline = 10 x the small run)",
                        10 * small["seconds"], big["seconds"]))
    show(rows)
    append(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
