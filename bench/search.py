"""Top-5 cosine search: faiss flat vs numpy matmul + argpartition, and SQ8 codes vs flat.

    .venv/bin/python bench/search.py [--quick] [--dims 128 3584] [--n N] [--queries Q]

Synthetic clustered vectors (Gaussian blobs: neighbours exist, as in embedding databases),
282,564 database vectors as in the paper's training set (--quick: 50,000), a batch of 1,000
queries (--quick: 200), at d=128 (the tiny model's hidden size) and d=3584 (Qwen2-VL-7B's).
At d=3584 the float32 database is ~4 GB and is held about three times (raw, faiss flat, SQ8).
The SQ8 scan decodes every code for every query (no BLAS), so at d > 1024 its row uses
--sq8-queries (default 200) queries, timed against flat on the same queries. Runs alternate,
with pauses, and the fastest of --repeat runs is kept (the cores are shared). When the flat
database exceeds 2 GB, the flat index is timed and freed before SQ8 is built (memory).
Recall@5 of SQ8 against flat, and the memory of both, go in the row's size text.

faiss-cpu 1.15.1 bundles OpenBLAS 0.3.15, which does not recognise recent Xeons and runs its SSE3
"Prescott" kernels (the machine column names the core it picked); try
`OPENBLAS_CORETYPE=SkylakeX .venv/bin/python bench/search.py` on an AVX-512 CPU.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common import append, best_of, row, show, side_by_side
from skinlib import retrieval

K = 5


def clustered(rng, n, d, centres=1000, spread=0.5, chunk=20_000):
    c = rng.standard_normal((centres, d), dtype=np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):  # in chunks: the noise of a 4 GB database at once is 8 GB
        e = min(n, s + chunk)
        out[s:e] = c[rng.integers(0, centres, e - s)]
        out[s:e] += spread * rng.standard_normal((e - s, d), dtype=np.float32)
    return out


def numpy_topk(db, q, k=K, chunk=250):
    """The plain baseline on pre-normalised float32 arrays: matmul, argpartition, sort the k."""
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        sims = q[s:s + chunk] @ db.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sims, part, axis=1)
        out[s:s + chunk] = np.take_along_axis(part, np.argsort(-top, axis=1), axis=1)
    return out


def normalize_inplace(x, chunk=20_000):
    for s in range(0, len(x), chunk):
        x[s:s + chunk] /= np.linalg.norm(x[s:s + chunk], axis=1, keepdims=True)
    return x


def bench_dim(d, n, n_q, n_sq8, repeat, seed=0):
    low_memory = n * d * 4 > 2 * 1024 ** 3
    rng = np.random.default_rng(seed)
    db = normalize_inplace(clustered(rng, n, d))
    q = normalize_inplace(clustered(rng, n_q, d))
    ids = np.arange(n)
    flat = retrieval.FlatIndex(d, device="cpu")
    flat.add(db, ids)
    mb = 1024 ** 2
    flat_mb = flat.nbytes / mb

    np_s, flat_s, np_ids, (flat_ids, _) = side_by_side(lambda: numpy_topk(db, q),
                                                       lambda: flat.search(q, K), repeat)
    agree = np.mean([len(set(a) & set(b)) / K for a, b in zip(np_ids, flat_ids)])
    rows = [row(f"search d={d}: faiss flat vs numpy matmul+argpartition",
                f"db={n} d={d} q={n_q} k={K} (top-5 overlap {agree:.4f})", np_s, flat_s)]

    qs = q[:n_sq8]
    if low_memory:  # d=3584 at full size: flat timed first, then freed before SQ8 is built
        flat_s2, (truth, _) = best_of(lambda: flat.search(qs, K))
        del flat
    sq8 = retrieval.CompressedIndex(d, "sq8")
    train_s, _ = best_of(lambda: sq8.add(db, ids))
    db = None  # free the float32 copy before the compressed search is timed
    if low_memory:
        time.sleep(0.5)
        sq8_s, (got, _) = best_of(lambda: sq8.search(qs, K))
    else:
        flat_s2, sq8_s, (truth, _), (got, _) = side_by_side(lambda: flat.search(qs, K),
                                                            lambda: sq8.search(qs, K), repeat)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, got)])
    rows.append(row(f"search d={d}: faiss SQ8 vs faiss flat",
                    f"db={n} d={d} q={len(qs)} k={K} recall@5={recall:.3f} "
                    f"memory {flat_mb:.0f} MB -> {sq8.nbytes / mb:.0f} MB "
                    f"(SQ8 train+add {train_s:.3g} s)", flat_s2, sq8_s))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="50,000 vectors, 200 queries")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 3584])
    p.add_argument("--n", type=int, default=None, help="database size (default 282,564)")
    p.add_argument("--queries", type=int, default=None, help="query batch (default 1,000)")
    p.add_argument("--sq8-queries", type=int, default=None,
                   help="queries for the SQ8 row at d > 1024 (default 200)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each, fastest kept")
    a = p.parse_args(argv)
    n = a.n or (50_000 if a.quick else 282_564)
    n_q = a.queries or (200 if a.quick else 1_000)
    rows = []
    for d in a.dims:
        n_sq8 = n_q if d <= 1024 else min(n_q, a.sq8_queries or 200)
        rows += bench_dim(d, n, n_q, n_sq8, a.repeat)
        append(rows[-2:])
    show(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
