"""sRGB (IEC 61966-2-1, D65) <-> CIE L*a*b* (D65 white), vectorised over (..., 3) arrays.

sRGB values are floats in [0, 1] (uint8 input is divided by 255). The reference white is the
XYZ of sRGB white (R = G = B = 1), so white maps to L* = 100, a* = b* = 0 exactly. The transfer
curve is extended symmetrically to negative values, so colours outside the sRGB gamut round-trip
too (`lab_to_srgb(..., clip=False)`) and can be detected as values outside [0, 1].
"""
from __future__ import annotations

import numpy as np

# Linear sRGB -> XYZ (D65), IEC 61966-2-1; the inverse is computed so the round trip is exact.
_M = np.array([[0.4124564, 0.3575761, 0.1804375],
               [0.2126729, 0.7151522, 0.0721750],
               [0.0193339, 0.1191920, 0.9503041]])
_M_INV = np.linalg.inv(_M)
WHITE = _M.sum(axis=1)  # XYZ of sRGB white, ~ (0.95047, 1.0, 1.08883)

_EPS = (6.0 / 29.0) ** 3
_K = 1.0 / (3.0 * (6.0 / 29.0) ** 2)


def _as_float(rgb) -> np.ndarray:
    a = np.asarray(rgb)
    if a.shape[-1:] != (3,):
        raise ValueError(f"expected an array with a last axis of 3 channels, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float64) / 255.0
    return a.astype(np.float64, copy=False)


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB transfer curve removed (gamma-encoded -> linear light), odd-symmetric."""
    a = np.abs(c)
    out = np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4)
    return np.copysign(out, c)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """Linear light -> gamma-encoded sRGB, odd-symmetric."""
    a = np.abs(c)
    out = np.where(a <= 0.0031308, 12.92 * a, 1.055 * a ** (1.0 / 2.4) - 0.055)
    return np.copysign(out, c)


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB (floats in [0, 1] or uint8) -> L*a*b*, same leading shape, float64."""
    xyz = srgb_to_linear(_as_float(rgb)) @ _M.T / WHITE
    f = np.where(xyz > _EPS, np.cbrt(xyz), xyz * _K + 4.0 / 29.0)
    L = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def _finv(f: np.ndarray) -> np.ndarray:
    """Inverse of the L*a*b* companding function f(t)."""
    return np.where(f > 6.0 / 29.0, f * f * f, (f - 4.0 / 29.0) / _K)


def lab_to_srgb(lab, clip: bool = True) -> np.ndarray:
    """L*a*b* -> sRGB floats; clipped to [0, 1] unless clip=False (then out-of-gamut shows)."""
    lab = _as_float(lab)
    fy = (lab[..., 0] + 16.0) / 116.0
    xyz = (_finv(fy + lab[..., 1] / 500.0) * WHITE[0], _finv(fy) * WHITE[1],
           _finv(fy - lab[..., 2] / 200.0) * WHITE[2])
    # the 3x3 matrix product channel by channel: a matmul with an inner size of 3 is slow
    lin = np.empty(lab.shape)
    for c in range(3):
        m = _M_INV[c]
        lin[..., c] = m[0] * xyz[0] + m[1] * xyz[1] + m[2] * xyz[2]
    rgb = linear_to_srgb(lin)
    return np.clip(rgb, 0.0, 1.0) if clip else rgb

