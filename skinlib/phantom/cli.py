"""``python -m skinlib.phantom``: write a phantom release, or refit the committed summaries of the
real rows (``--make-reference``, ``--make-malignancy``)."""
from __future__ import annotations

import argparse

from skinlib.phantom.malignancy_model import MALIGNANCY_PATH, make_malignancy
from skinlib.phantom.reference import REFERENCE_PATH, make_reference
from skinlib.phantom.release import generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skinlib.phantom",
                                 description="Write a synthetic SLICE-3D release (HDF5 of JPEG bytes + metadata CSV).")
    ap.add_argument("--n", type=int, default=1000, help="number of images")
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes (the result does not depend on it)")
    ap.add_argument("--make-reference", metavar="CSV",
                    help="fit the reference summary from a real train-metadata CSV")
    ap.add_argument("--make-malignancy", metavar="CSV",
                    help="fit the malignancy model P(target | 16 attributes) from a real train-metadata CSV")
    a = ap.parse_args(argv)
    if a.make_reference or a.make_malignancy:
        if a.make_reference:
            make_reference(a.make_reference)
            print(f"wrote {REFERENCE_PATH}")
        if a.make_malignancy:
            make_malignancy(a.make_malignancy)
            print(f"wrote {MALIGNANCY_PATH}")
        return 0
    if not a.out:
        ap.error("--out is required")
    meta = generate(a.n, a.out, seed=a.seed, workers=a.workers)
    print(f"wrote {len(meta)} images of {meta['patient_id'].nunique()} patients to {a.out}")
    return 0
