"""Lesion geometry: the crop's field of view and a star-shaped contour r(θ) (ellipse × low-order
lobes × high-frequency jaggedness) solved for a target area, minor axis, area_perim_ratio and
norm_border; exact radii of the polygon along any direction."""
from __future__ import annotations

import math

import numpy as np
from scipy.spatial import ConvexHull

try:   # low-level Qhull wrapper (private; see _hull_area_perimeter)
    from scipy.spatial._qhull import _Qhull
except ImportError:   # pragma: no cover
    _Qhull = None

from skinlib import measure

FOV_MM = 15.0
N_VERT = 256            # contour vertices, uniform in angle around the drawing centre
LOBE_SKEW = 4.0         # sharpness of the lobes' soft minimum: bays, not bulges (see _bays)

_THETA = np.arange(N_VERT) * (2 * np.pi / N_VERT)
_COS, _SIN = np.cos(_THETA), np.sin(_THETA)
_DTHETA = 2 * np.pi / N_VERT
_COS1, _SIN1 = np.roll(_COS, -1), np.roll(_SIN, -1)
_SIN_D, _2COS_D = math.sin(_DTHETA), 2 * math.cos(_DTHETA)
# The polygon's first and second area moments (Green's theorem over the edges) are sums of the
# edge monomials r_i^a r_i+1^b (a + b = 3, 4) times fixed functions of the edge's angles: those
# functions, one column per moment (x, y, xx, yy, xy), so that a moment sum is one product.
_MOMENT_W = np.concatenate([
    np.column_stack([_COS, _SIN, 0 * _COS, 0 * _COS, 0 * _COS]),                    # r² r1
    np.column_stack([_COS1, _SIN1, 0 * _COS, 0 * _COS, 0 * _COS]),                  # r r1²
    np.column_stack([0 * _COS, 0 * _COS, _COS ** 2, _SIN ** 2, 2 * _COS * _SIN]),   # r³ r1
    np.column_stack([0 * _COS, 0 * _COS, _COS * _COS1, _SIN * _SIN1,
                     _COS * _SIN1 + _COS1 * _SIN]),                                  # r² r1²
    np.column_stack([0 * _COS, 0 * _COS, _COS1 ** 2, _SIN1 ** 2, 2 * _COS1 * _SIN1]),  # r r1³
]) * _SIN_D


def _shape_basis(rng, k_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random unit-strength lobe (k = 2..5) and jaggedness (k = 5..k_max) series on _THETA,
    plus a phase for the ellipse. Jaggedness is normalised so that sum((k a_k)²) = 1 (its
    effect on the perimeter), lobes so that sum(a_k²) = 1, then made into bays (`_bays`)."""
    kl = np.arange(2, 6)
    al = rng.rayleigh(1.0, kl.size) / np.sqrt(kl)
    al /= np.sqrt((al ** 2).sum())
    lobes = _bays((al[:, None] * np.cos(kl[:, None] * _THETA + rng.uniform(0, 2 * np.pi, kl.size)[:, None])).sum(0))
    kj = np.arange(5, max(k_max, 8) + 1)
    aj = rng.rayleigh(1.0, kj.size) / kj
    aj /= np.sqrt(((aj * kj) ** 2).sum())
    jag = (aj[:, None] * np.cos(kj[:, None] * _THETA + rng.uniform(0, 2 * np.pi, kj.size)[:, None])).sum(0)
    return lobes, jag, rng.uniform(0, np.pi)


def _bays(lobes: np.ndarray) -> np.ndarray:
    """Low-order irregularity as bays rather than bulges: a soft minimum (softplus of sharpness
    LOBE_SKEW) flattens the outward crests of the lobe series and keeps its inward dips, then
    the series is re-centred and given back its standard deviation.

    Symmetric lobes push the outline out along the long axis, so the maximum Feret diameter ran
    ~8 % above the release's at a given area and minor axis (the release's long diameter sits
    near the moment-ellipse major axis, ~1.02x); notched outlines keep the outer extent of the
    smooth shape and take their border irregularity (solidity) from indentations.
    """
    sd = lobes.std()
    if sd <= 0:
        return lobes
    y = -np.logaddexp(0.0, -LOBE_SKEW * lobes / sd) / LOBE_SKEW
    y -= y.mean()
    return y * (sd / y.std())


def _unit_radius(q, lam, j, psi, lobes, jag) -> np.ndarray:
    t = _THETA - psi
    return q / np.sqrt((q * np.cos(t)) ** 2 + np.sin(t) ** 2) * np.exp(lam * lobes + j * jag)


def _hull_area_perimeter(points: np.ndarray) -> tuple[float, float]:
    """(area, perimeter) of the 2-D convex hull. Straight from Qhull when scipy's low-level
    wrapper is there (a third of the cost of building a full ConvexHull object, whose
    simplices, neighbours and equations the solver never reads); else via ConvexHull."""
    if _Qhull is not None:
        try:
            q = _Qhull(b"i", points, b"", required_options=b"Qt")
            try:
                return q.volume_area()
            finally:
                q.close()
        except Exception:   # a changed private API: fall back to the public one
            pass
    hull = ConvexHull(points)   # in 2-D: volume = area, area = perimeter
    return float(hull.volume), float(hull.area)


def _fast_shape(r: np.ndarray) -> tuple[float, float, float, float]:
    """(area, minor²/area, perimeter²/area, norm_border) of the star polygon with radii r.

    The same quantities as skinlib.measure (which the tests hold it to), fused in one pass
    because the shape solver calls it a couple of dozen times per lesion: the vertices sit at
    the fixed angles _THETA, so each edge's cross product is r_i r_i+1 sin(dθ) and its length
    comes from the law of cosines; the moment sums are one product with _MOMENT_W.
    """
    r1 = np.concatenate((r[1:], r[:1]))
    rr1 = r * r1
    a2 = float(rr1.sum()) * _SIN_D   # twice the area
    rr1_r, rr1_r1 = rr1 * r, rr1 * r1
    sx, sy, sxx, syy, sxy = np.concatenate((rr1_r, rr1_r1, rr1_r * r, rr1_r * r1, rr1_r1 * r1)) @ _MOMENT_W
    cx, cy = sx / (3 * a2), sy / (3 * a2)
    sxx, syy, sxy = sxx / (6 * a2) - cx * cx, syy / (6 * a2) - cy * cy, sxy / (12 * a2) - cx * cy
    a = a2 / 2.0
    ev_min = (sxx + syy) / 2 - math.sqrt(((sxx - syy) / 2) ** 2 + sxy * sxy)
    minor = 4.0 * math.sqrt(max(ev_min, 0.0))
    perim = float(np.sqrt(np.maximum(r * r + r1 * r1 - _2COS_D * rr1, 0.0)).sum())
    hull_area, hull_perim = _hull_area_perimeter(np.column_stack([r * _COS, r * _SIN]))
    score = (measure.BORDER_CONVEXITY_WEIGHT * (1.0 - hull_perim / perim)
             + measure.BORDER_SOLIDITY_WEIGHT * (1.0 - a / hull_area))
    return a, minor ** 2 / a, perim ** 2 / a, min(max(score, 0.0), 10.0)


def solve_shape(rng, area: float, minor: float, apr: float, nb: float, mm_per_px: float):
    """Radii (N_VERT,) in mm of a star-shaped contour aimed at the target area, minor axis,
    area_perim_ratio and norm_border, plus its drawing parameters.

    The scale-free targets (minor²/area, perimeter²/area, norm_border) are reached by a few
    Broyden steps on (axis ratio q, lobe strength, jaggedness); the area then fixes the scale.
    """
    r_eq = math.sqrt(area / math.pi)
    k_max = int(np.clip(2 * math.pi * r_eq / mm_per_px / 2.5, 8, 40))  # jags no finer than ~2.5 px
    lobes, jag, psi = _shape_basis(rng, k_max)
    mu_t = min(minor ** 2 / area, 4 / math.pi * 0.99)
    # p = (axis ratio, lobes², jaggedness²): perimeter and hull deficits grow ~ quadratically
    # in the amplitudes, so the squares make the residuals ~ linear and the Jacobian regular at 0
    lo, hi = np.array([0.12, 0.0, 0.0]), np.array([1.0, 0.25, 9.0])

    t = _THETA - psi
    c2, s2 = np.cos(t) ** 2, np.sin(t) ** 2   # _unit_radius, with what does not change hoisted

    def radii(p):
        return p[0] / np.sqrt(p[0] * p[0] * c2 + s2) * np.exp(math.sqrt(p[1]) * lobes + math.sqrt(p[2]) * jag)

    def resid(p):
        _, mu, a, b = _fast_shape(radii(p))
        return np.array([mu / mu_t - 1.0, math.log(a / apr), (b - nb) / 4.0])

    q0 = float(np.clip(mu_t * math.pi / 4, lo[0], hi[0]))
    ell = 4 * math.pi * (1 + ((1 - q0) / (1 + q0)) ** 2 / 4) ** 2 / q0  # Ramanujan-ish P²/A
    p = np.array([q0, float(np.clip(0.03 + 0.03 * nb, 0, 0.5)) ** 2,
                  float(np.clip(2 * math.sqrt(max(math.sqrt(apr / ell) - 1, 0.0)), 0.05, 3)) ** 2])
    f = resid(p)
    best = (np.abs(f).max(), p.copy())
    jac = np.empty((3, 3))
    for _ in range(6):   # damped Gauss-Newton, forward-difference Jacobian at every step
        if best[0] < 0.03:   # a few % is close enough: the truth is measured, not aimed
            break
        for k, h in enumerate((0.02, 0.004, 0.08)):
            dp = np.zeros(3)
            dp[k] = h if p[k] + h <= hi[k] else -h
            jac[:, k] = (resid(p + dp) - f) / dp[k]
        step = -np.linalg.lstsq(jac, f, rcond=None)[0]
        for damp in (1.0, 0.4):
            new = np.clip(p + damp * step, lo, hi)
            fn = resid(new)
            if np.abs(fn).max() < np.abs(f).max():
                break
        p, f = new, fn
        if np.abs(f).max() < best[0]:
            best = (np.abs(f).max(), p.copy())
    p = best[1]
    r = radii(p)
    area_unit = 0.5 * np.sum(r * np.roll(r, -1)) * math.sin(_DTHETA)
    scale = math.sqrt(area / area_unit)
    return r * scale, {"axis_ratio": float(p[0]), "lobes": math.sqrt(p[1]), "jaggedness": math.sqrt(p[2]),
                       "orientation_deg": float(np.degrees(psi) % 180)}


def polygon_radius_at(r: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Exact radius, at angles theta, of the star polygon with vertex radii r at _THETA."""
    return _radius_along(r, _edge_index(theta), np.cos(theta), np.sin(theta))


def _edge_index(theta: np.ndarray) -> np.ndarray:
    """Index i of the polygon edge (vertex i to i + 1) that the ray at angle theta crosses."""
    return np.floor(np.asarray(theta) * (1 / _DTHETA)).astype(np.intp) % N_VERT   # np.mod on floats is slow


def _radius_along(r: np.ndarray, i: np.ndarray, ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    """Radius of the star polygon along unit directions (ux, uy) that cross edges i: where the
    ray meets the edge, cross(v_i, e_i) / cross(u, e_i), with e_i = v_i+1 - v_i (no trigonometry,
    so the angles and directions of a pixel grid are worked out once per crop, not per radii)."""
    x, y = r * _COS, r * _SIN
    ex, ey = np.roll(x, -1) - x, np.roll(y, -1) - y
    return (x * ey - y * ex)[i] / (ux * ey[i] - uy * ex[i])
