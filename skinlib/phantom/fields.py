"""Smooth random fields on a crop (skin texture, variegation, freckles, glints), filtered in the
frequency domain on a grid a little larger than the crop so that they do not wrap around."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import fft


@lru_cache(maxsize=None)
def _grid(size: int, mm_per_px: float) -> tuple[int, np.ndarray]:
    """FFT size (a fast length >= size + margin, so fields are not periodic on the crop) and
    the squared frequencies (cycles/mm) of its real FFT. Cached (71 sizes); read-only."""
    n = fft.next_fast_len(size + 16, real=True)
    fy = fft.fftfreq(n, d=mm_per_px)[:, None]
    fx = fft.rfftfreq(n, d=mm_per_px)[None, :]
    f2 = fx * fx + fy * fy
    f2.flags.writeable = False
    return n, f2


@lru_cache(maxsize=None)
def _grid32(size: int, mm_per_px: float) -> np.ndarray:
    """-2π² f² of `_grid` in single precision, the exponent of a Gaussian low-pass per mm²."""
    g = (-2 * np.pi ** 2 * _grid(size, mm_per_px)[1]).astype(np.float32)
    g.flags.writeable = False
    return g


def _noise_fields(rng, size: int, mm_per_px: float, sigmas_mm, weights=None, count: int = 1):
    """`count` independent smooth Gaussian fields (unit std on the crop) with a spectrum that is
    a weighted sum of Gaussian low-pass filters of the given spatial sigmas (mm), via FFT.

    The white noise filtered in the frequency domain is uniform (random bytes, 256 levels), not
    normal: each pixel sums thousands of independent coefficients, so the field is Gaussian all
    the same (same spectrum, hence same covariance), and random bytes cost a tenth of normal
    draws, which were the largest single cost of a crop."""
    n, f2 = _grid(size, mm_per_px)
    e2 = _grid32(size, mm_per_px)
    weights = np.ones(len(sigmas_mm)) if weights is None else np.asarray(weights, dtype=float)
    # single precision: plenty for a texture, and twice as fast to filter, draw and transform
    filt = sum(np.float32(w) * np.exp(np.float32(s * s) * e2) for w, s in zip(weights, sigmas_mm))
    spec = np.empty((count, *f2.shape), dtype=np.complex64)
    white = spec.view(np.float32)          # real and imaginary parts, interleaved
    white[...] = np.frombuffer(rng.bytes(white.size), dtype=np.int8).reshape(white.shape)
    white += np.float32(0.5)               # zero mean; the scale goes with the normalisation
    spec *= filt
    g = fft.irfft2(spec, s=(n, n), axes=(-2, -1))[:, :size, :size].astype(np.float64)
    g -= g.mean(axis=(1, 2), keepdims=True)
    g /= (np.sqrt(np.einsum("ijk,ijk->i", g, g) / (size * size)) + 1e-12)[:, None, None]   # the std
    return list(g)


def _blobs(size: int, mm_per_px: float, yx: np.ndarray, amp: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Sum of Gaussian blobs (peak height amp) at pixel positions yx, via FFT."""
    n, f2 = _grid(size, mm_per_px)
    img = np.zeros((n, n))
    np.add.at(img, (yx[:, 0], yx[:, 1]), amp)
    filt = np.exp(-2 * np.pi ** 2 * sigma_mm ** 2 * f2)
    out = fft.irfft2(fft.rfft2(img) * filt, s=(n, n))[:size, :size]
    return out * (2 * np.pi * (sigma_mm / mm_per_px) ** 2)
