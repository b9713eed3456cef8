"""The release's files: ``train-image.hdf5`` (JPEG bytes per isic_id), ``train-metadata.csv`` and
the ``phantom-nuisance.csv`` sidecar, drawn in chunks over worker processes with the same result
for any number of workers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from skinlib import resumable
from skinlib.phantom.lesion import Lesion, draw_lesion
from skinlib.phantom.metadata import metadata_row
from skinlib.phantom.patients import make_patient, plan_patients
from skinlib.phantom.reference import load_reference
from skinlib.phantom.streams import _rng

ID_FORMAT = "PH_{:07d}"
IMAGE_FILE, METADATA_FILE, NUISANCE_FILE = "train-image.hdf5", "train-metadata.csv", "phantom-nuisance.csv"


def _draw_image(seed: int, i: int, patient_index: int) -> Lesion:
    """Image i of the phantom with `seed`: its own RNGs, its patient's skin."""
    return draw_lesion(_rng(seed, 2, i), patient=make_patient(seed, int(patient_index)),
                       nuisance_rng=_rng(seed, 3, i))


def _make_chunk(args) -> list[tuple[str, bytes, dict, dict]]:
    """Images start .. start + len(patients) - 1: (isic_id, JPEG bytes, metadata row, nuisance row)."""
    # One BLAS thread: the matrix products here are small, and with several worker processes each
    # starting a BLAS thread per core, 5,000 crops on 2 cores took 101 s instead of 36 s.
    from threadpoolctl import threadpool_limits

    seed, start, patients = args
    out = []
    with threadpool_limits(limits=1, user_api="blas"):
        for k, p in enumerate(patients):
            i = start + k
            lesion = _draw_image(seed, i, p)
            isic_id = ID_FORMAT.format(i + 1)
            row = metadata_row(isic_id, lesion, make_patient(seed, int(p)), _rng(seed, 4, i), _rng(seed, 5, i))
            nuis = {"isic_id": isic_id, **lesion.nuisance, **{f"aim_{k2}": v for k2, v in lesion.targets.items()}}
            out.append((isic_id, lesion.jpeg, row, nuis))
    return out


def _chunks(n: int, seed: int, size: int = 64):
    pidx = plan_patients(n, seed)
    for s in range(0, n, size):
        yield seed, s, pidx[s:s + size]


def generate(n: int, out_dir, seed: int = 0, workers: int = 1, progress: bool = True):
    """Write an n-image phantom release into out_dir; returns the metadata DataFrame.

    Files: train-image.hdf5, train-metadata.csv (the release's 55 columns, in order) and
    phantom-nuisance.csv. The result depends on (n, seed) only, not on `workers`. Files are
    written under temporary names and renamed at the end, so an interrupted run never leaves
    a release that looks complete.
    """
    import h5py
    import pandas as pd
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = load_reference()
    rows, nuis = [], []
    tmp_h5 = resumable.partial_path(out / IMAGE_FILE)
    jobs = list(_chunks(n, seed))
    bar = tqdm(total=n, desc="phantom", unit="img", disable=not progress)
    with h5py.File(tmp_h5, "w") as h5:
        if workers > 1:
            import multiprocessing as mp
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers)
            results = pool.imap(_make_chunk, jobs)
        else:
            pool, results = None, map(_make_chunk, jobs)
        try:
            for chunk in results:
                for isic_id, jpeg, row, nu in chunk:
                    h5.create_dataset(isic_id, data=np.void(jpeg))
                    rows.append(row)
                    nuis.append(nu)
                bar.update(len(chunk))
        finally:
            if pool is not None:
                pool.terminate()
            bar.close()
    meta = pd.DataFrame(rows).reindex(columns=ref["columns"])
    resumable.write_text(out / METADATA_FILE, meta.to_csv(index=False))
    resumable.write_text(out / NUISANCE_FILE, pd.DataFrame(nuis).to_csv(index=False))
    os.replace(tmp_h5, out / IMAGE_FILE)
    return meta

