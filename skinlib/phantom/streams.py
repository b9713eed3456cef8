"""The phantom's random streams: one generator per (seed, key), so that a release depends on its
seed and size only, never on how many workers drew it or in which order.

Keys in use: (0,) the lesions-per-patient plan, (1, patient) a patient, (2, image) an image's
drawing, (3, image) its acquisition nuisances, (4, image) its metadata columns, (5, image) its
malignancy label.
"""
from __future__ import annotations

import numpy as np


def _rng(seed: int, *key: int) -> np.random.Generator:
    """The generator of stream `key` of the phantom with `seed`."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, key)])))


def _pick(rng, freq: dict):
    """A key of `freq` ({key: count}), drawn with probability proportional to its count."""
    keys = list(freq)
    p = np.asarray([freq[k] for k in keys], dtype=float)
    return keys[rng.choice(len(keys), p=p / p.sum())]
