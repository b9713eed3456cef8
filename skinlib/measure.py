"""The 16 lesion attributes, measured: pure functions of a contour, an L*a*b* image and a mask.

Shape attributes come from the lesion's closed contour polygon in mm, shape (n, 2), vertices in
order, last vertex not repeated. Colour attributes come from an L*a*b* image (H, W, 3), a boolean
lesion mask (H, W) and the pixel size `mm_per_px`.

Six are exact geometric or colourimetric definitions that match the SLICE-3D release:
areaMM2, perimeterMM, area_perim_ratio (= perimeter² / area, exactly as released), minorAxisMM,
clin_size_long_diam_mm, A, B, Aext, Bext, deltaL, deltaB, stdLExt. Four are proprietary TBP
(Canfield "lesion visualizer") measures whose formulas are not public; here they are *analogues*
with their own documented definitions, tuned to sit on the release's scale:
norm_border, norm_color, radial_color_std_max, and (in its choice of ring) deltaLB.

Regions around the lesion (see `regions`):
- inside: the mask;
- core: inside pixels at least CORE_MM from the border (colour-variation measures use it, so a
  soft lesion edge does not count as colour variation);
- ext: outside pixels farther than GUARD_MM from the lesion (the "outside" skin);
- ring: the first RING_MM of ext (the "immediate surrounding skin" of deltaLB).
Distances are Euclidean pixel distances (scipy.ndimage.distance_transform_edt) times mm_per_px.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from skinlib import attributes

GUARD_MM = 0.5   # skin within this distance of the lesion is neither inside nor ext
RING_MM = 1.0    # width of the immediate-surrounding ring used by deltaLB
CORE_MM = 0.3    # inner margin left out of the colour-variation measures
MIN_CORE_PX = 8  # fewer core pixels: colour variation undefined, written 0 as in the release
N_SECTORS = 8    # angular sectors of radial_color_std_max
MIN_SECTOR_PX = 2

NORM_COLOR_DEADZONE = 0.8  # L*a*b* RMS std below which norm_color is 0
NORM_COLOR_SCALE = 2.5     # norm_color units per L*a*b* unit above the dead zone
RADIAL_DEADZONE = 0.3      # sector-mean std below which radial_color_std_max is 0
BORDER_CONVEXITY_WEIGHT = 6.0
BORDER_SOLIDITY_WEIGHT = 30.0


# ----------------------------------------------------------------------------- shape
def _check_contour(contour) -> np.ndarray:
    c = np.asarray(contour, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] < 3:
        raise ValueError(f"contour must be an (n >= 3, 2) array of vertices in mm, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("contour has non-finite vertices")
    return c


def polygon_area(contour) -> float:
    """Area enclosed by the polygon (shoelace formula), mm²; orientation-free."""
    c = _check_contour(contour)
    x, y = c[:, 0], c[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def polygon_perimeter(contour) -> float:
    """Length of the closed polygon, mm (sum of segment lengths, closing segment included)."""
    c = _check_contour(contour)
    d = np.diff(c, axis=0, append=c[:1])
    return float(np.hypot(d[:, 0], d[:, 1]).sum())


def area_perim_ratio(contour) -> float:
    """perimeter² / area, the release's exact definition (a circle gives 4π ≈ 12.57)."""
    return polygon_perimeter(contour) ** 2 / polygon_area(contour)


def second_moments(contour) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (2,) and covariance (2, 2) of the uniform distribution over the polygon's area.

    Green's theorem over the edges; exact for any simple polygon.
    """
    c = _check_contour(contour)
    x0, y0 = c[:, 0], c[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    cross = x0 * y1 - x1 * y0
    a = cross.sum() / 2.0
    if abs(a) < 1e-15:
        raise ValueError("degenerate contour (zero area)")
    cx = ((x0 + x1) * cross).sum() / (6.0 * a)
    cy = ((y0 + y1) * cross).sum() / (6.0 * a)
    sxx = ((x0 * x0 + x0 * x1 + x1 * x1) * cross).sum() / (12.0 * a)
    syy = ((y0 * y0 + y0 * y1 + y1 * y1) * cross).sum() / (12.0 * a)
    sxy = ((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross).sum() / (24.0 * a)
    cov = np.array([[sxx - cx * cx, sxy - cx * cy], [sxy - cx * cy, syy - cy * cy]])
    return np.array([cx, cy]), cov


def equivalent_ellipse_axes(contour) -> tuple[float, float]:
    """(major, minor) full axis lengths of the ellipse with the polygon's second area moments.

    A uniform ellipse with semi-axes a > b has variances a²/4 and b²/4 along its axes, so the
    full axes are 4·sqrt(eigenvalues of the covariance).
    """
    _, cov = second_moments(contour)
    ev = np.linalg.eigvalsh(cov)
    return 4.0 * float(np.sqrt(max(ev[1], 0.0))), 4.0 * float(np.sqrt(max(ev[0], 0.0)))


def minor_axis(contour) -> float:
    """minorAxisMM: minor axis of the moment-equivalent ellipse (2b for an ellipse)."""
    return equivalent_ellipse_axes(contour)[1]


def eccentricity(contour) -> float:
    """Eccentricity sqrt(1 - (minor/major)²) of the moment-equivalent ellipse."""
    major, minor = equivalent_ellipse_axes(contour)
    return float(np.sqrt(max(0.0, 1.0 - (minor / major) ** 2)))


def convex_hull(contour) -> np.ndarray:
    """Vertices of the convex hull, counter-clockwise, (h, 2)."""
    c = _check_contour(contour)
    return c[ConvexHull(c).vertices]


def _feret_of_hull(h: np.ndarray) -> float:
    dx = h[:, 0, None] - h[None, :, 0]
    dy = h[:, 1, None] - h[None, :, 1]
    return float(np.sqrt((dx * dx + dy * dy).max()))


def max_feret(contour) -> float:
    """clin_size_long_diam_mm: maximum Feret diameter (largest vertex-to-vertex distance)."""
    return _feret_of_hull(convex_hull(contour))


def _hull_stats(c: np.ndarray, hull: ConvexHull | None = None) -> tuple[float, float]:
    hull = hull if hull is not None else ConvexHull(c)  # in 2-D: volume = area, area = perimeter
    return float(hull.volume), float(hull.area)


def norm_border(contour) -> float:
    """Border irregularity on 0-10, an ANALOGUE of TBP's proprietary `tbp_lv_norm_border`.

    norm_border = clip(6·(1 - convexity) + 30·(1 - solidity), 0, 10) with
    convexity = hull perimeter / perimeter (penalises fine jaggedness of the border) and
    solidity = area / hull area (penalises lobes and notches). Any convex outline scores 0;
    the score grows monotonically as the border departs from its convex hull. The weights put
    the phantom's lesions on the release's scale (real 5/50/95 % ≈ 1.5/3.0/7.0).
    """
    c = _check_contour(contour)
    return _norm_border(c, ConvexHull(c), polygon_area(c), polygon_perimeter(c))


def _norm_border(c: np.ndarray, hull: ConvexHull, area: float, perim: float) -> float:
    hull_area, hull_perim = _hull_stats(c, hull)
    convexity = hull_perim / perim
    solidity = area / hull_area
    score = BORDER_CONVEXITY_WEIGHT * (1.0 - convexity) + BORDER_SOLIDITY_WEIGHT * (1.0 - solidity)
    return float(np.clip(score, 0.0, 10.0))


def shape_attributes(contour) -> dict[str, float]:
    """areaMM2, perimeterMM, area_perim_ratio, minorAxisMM, clin_size_long_diam_mm, norm_border."""
    c = _check_contour(contour)
    area, perim = polygon_area(c), polygon_perimeter(c)
    hull = ConvexHull(c)   # one hull for the Feret diameter and the border score
    return {
        "areaMM2": area,
        "perimeterMM": perim,
        "area_perim_ratio": perim ** 2 / area,
        "minorAxisMM": minor_axis(c),
        "clin_size_long_diam_mm": _feret_of_hull(c[hull.vertices]),
        "norm_border": _norm_border(c, hull, area, perim),
    }


# ----------------------------------------------------------------------------- colour
class Regions(NamedTuple):
    inside: np.ndarray
    core: np.ndarray
    ring: np.ndarray
    ext: np.ndarray


def regions(mask, mm_per_px: float) -> Regions:
    """Boolean masks inside / core / ring / ext for a lesion mask (see the module docstring)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if not mm_per_px > 0:
        raise ValueError(f"mm_per_px must be positive, got {mm_per_px}")
    if not mask.any():
        raise ValueError("empty lesion mask")
    # The distances only matter up to GUARD_MM + RING_MM from the lesion, so both transforms run
    # on the lesion's bounding box grown by that much (plus a pixel): the same values there, and
    # every pixel beyond it is ext and not ring. A small lesion in a large crop costs far less.
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    m = int(np.ceil((GUARD_MM + RING_MM) / mm_per_px)) + 2
    box = (slice(max(rows[0] - m, 0), rows[-1] + m + 1), slice(max(cols[0] - m, 0), cols[-1] + m + 1))
    sub = mask[box]
    d_out = ndimage.distance_transform_edt(~sub) * mm_per_px  # outside: distance to the lesion
    d_in = ndimage.distance_transform_edt(sub) * mm_per_px    # inside: distance to the skin
    ext = np.ones_like(mask)
    ext[box] = d_out > GUARD_MM
    if not ext.any():
        raise ValueError("no skin outside the lesion's guard band: cannot measure the outside")
    ring = np.zeros_like(mask)
    ring[box] = ext[box] & (d_out <= GUARD_MM + RING_MM)
    if not ring.any():
        ring = ext
    core = np.zeros_like(mask)
    core[box] = sub & (d_in >= CORE_MM)
    return Regions(mask, core, ring, ext)


def _check_lab(lab, mask) -> np.ndarray:
    lab = np.asarray(lab, dtype=np.float64)
    if lab.ndim != 3 or lab.shape[2] != 3:
        raise ValueError(f"lab must be an (H, W, 3) L*a*b* image, got shape {lab.shape}")
    if np.shape(mask) != lab.shape[:2]:
        raise ValueError(f"mask shape {np.shape(mask)} does not match image {lab.shape[:2]}")
    return lab


def core_color_std(lab, core) -> float:
    """RMS over L*, a*, b* of the per-channel standard deviation inside the core; NaN if too small."""
    if core.sum() < MIN_CORE_PX:
        return float("nan")
    return float(np.sqrt(lab[core].var(axis=0).mean()))


def norm_color_from_std(s: float) -> float:
    """norm_color for a core colour std `s`: 0 in the dead zone, then linear, clipped to 10."""
    if not np.isfinite(s):
        return 0.0
    return float(np.clip(NORM_COLOR_SCALE * (s - NORM_COLOR_DEADZONE), 0.0, 10.0))


def norm_color(lab, mask, mm_per_px: float) -> float:
    """Colour variation inside the lesion on 0-10, an ANALOGUE of TBP's `tbp_lv_norm_color`.

    s = RMS over L*, a*, b* of the per-channel std over the lesion core (CORE_MM inside the
    border); norm_color = clip(2.5·(s - 0.8), 0, 10). The dead zone (s ≤ 0.8) gives exact zeros
    for nearly uniform lesions, as the release does for ~8 % of lesions; a core of fewer than
    MIN_CORE_PX pixels (tiny lesion) is undefined and written 0.
    """
    lab = _check_lab(lab, mask)
    return norm_color_from_std(core_color_std(lab, regions(mask, mm_per_px).core))


def sector_means(lab, core) -> np.ndarray:
    """(N_SECTORS, 3) mean L*a*b* per angular sector around the core's centroid (NaN if sparse)."""
    yy, xx = np.nonzero(core)
    ang = np.arctan2(yy - yy.mean(), xx - xx.mean())
    idx = np.minimum(((ang + np.pi) / (2 * np.pi) * N_SECTORS).astype(int), N_SECTORS - 1)
    counts = np.bincount(idx, minlength=N_SECTORS).astype(np.float64)
    vals = lab[yy, xx]
    sums = np.stack([np.bincount(idx, weights=vals[:, c], minlength=N_SECTORS) for c in range(3)], 1)
    out = sums / np.maximum(counts, 1.0)[:, None]
    out[counts < MIN_SECTOR_PX] = np.nan
    return out


def radial_std_from_sectors(means: np.ndarray) -> float:
    """radial_color_std_max from sector means: max over channels of the std across sectors,
    minus the dead zone, clipped to [0, 10]; 0 when fewer than 4 sectors are populated."""
    ok = np.all(np.isfinite(means), axis=1)
    if ok.sum() < 4:
        return 0.0
    s = float(means[ok].std(axis=0).max())
    return float(np.clip(s - RADIAL_DEADZONE, 0.0, 10.0))


def radial_color_std_max(lab, mask, mm_per_px: float) -> float:
    """Colour asymmetry, an ANALOGUE of TBP's `tbp_lv_radial_color_std_max`.

    The lesion core is cut into 8 angular sectors around its centroid; for each of L*, a*, b*
    take the std across sectors of the sector-mean colour; the score is the largest of the
    three minus a dead zone of 0.3 (so a uniform or merely noisy lesion scores 0), clipped to
    [0, 10]. A lesion darker on one side than the other scores high.
    """
    lab = _check_lab(lab, mask)
    core = regions(mask, mm_per_px).core
    if core.sum() < MIN_CORE_PX:
        return 0.0
    return radial_std_from_sectors(sector_means(lab, core))


def color_measures(lab, mask, mm_per_px: float, reg: Regions | None = None) -> dict[str, float]:
    """All colour measures: the 10 colour attributes plus L, Lext, deltaA, stdL, color_std_mean.

    A, B, L: mean a*, b*, L* over the inside; Aext, Bext, Lext: means over ext (skin beyond
    the GUARD_MM band); deltaL = L - Lext and deltaB = B - Bext exactly; stdLExt: std of L* over
    ext; deltaLB: hypot(L - L_ring, B - B_ring) against the *immediate* ring (the first RING_MM
    of ext), an analogue of TBP's lesion-vs-surrounding L*B* contrast; norm_color and
    radial_color_std_max as in their functions. `reg`: the regions of `mask`, if already computed.
    """
    lab = _check_lab(lab, mask)
    reg = reg if reg is not None else regions(mask, mm_per_px)  # a caller may pass them to save the work
    flat = lab.reshape(-1, 3)

    def mean_over(region):   # one matrix-vector product instead of gathering the pixels
        w = region.ravel().astype(np.float64)
        return (w @ flat) / w.sum()

    def std_l(region, mean):   # std of L* over the region, two-pass as numpy's std
        d = lab[..., 0][region] - mean
        return float(np.sqrt(np.dot(d, d) / d.size))

    m_in, m_ext, m_ring = mean_over(reg.inside), mean_over(reg.ext), mean_over(reg.ring)
    s = core_color_std(lab, reg.core)
    radial = 0.0 if not np.isfinite(s) else radial_std_from_sectors(sector_means(lab, reg.core))
    L, A, B = (float(v) for v in m_in)
    Lext, Aext, Bext = (float(v) for v in m_ext)
    return {
        "A": A, "B": B, "Aext": Aext, "Bext": Bext,
        "deltaL": L - Lext, "deltaB": B - Bext,
        "deltaLB": float(np.hypot(m_in[0] - m_ring[0], m_in[2] - m_ring[2])),
        "stdLExt": std_l(reg.ext, Lext),
        "norm_color": norm_color_from_std(s),
        "radial_color_std_max": radial,
        # extras (not among the 16), used to fill other release columns
        "L": L, "Lext": Lext, "deltaA": A - Aext,
        "stdL": std_l(reg.inside, L),
        "color_std_mean": 0.0 if not np.isfinite(s) else max(s - NORM_COLOR_DEADZONE, 0.0),
    }


def measure_all(contour, lab, mask, mm_per_px: float, extras: bool = False,
                reg: Regions | None = None) -> dict[str, float]:
    """The 16 attributes keyed by the registry's short names, in registry order.

    With extras=True the colour extras (L, Lext, deltaA, stdL, color_std_mean) and the
    moment-ellipse eccentricity are appended.
    """
    shape = shape_attributes(contour)
    col = color_measures(lab, mask, mm_per_px, reg)
    out = {name: (shape[name] if name in shape else col[name]) for name in attributes.NAMES}
    if extras:
        out.update({k: col[k] for k in ("L", "Lext", "deltaA", "stdL", "color_std_mean")})
        out["eccentricity"] = eccentricity(contour)
    return out


# ----------------------------------------------------------------------------- documentation
# How each attribute is measured here: (matches the release's definition?, definition).
_DEFINITIONS = {
    "areaMM2": (True, "area enclosed by the lesion contour (shoelace formula), mm²"),
    "minorAxisMM": (True, "minor axis of the ellipse with the contour's second area moments, mm"),
    "norm_border": (False, "6·(1 − hull perimeter / perimeter) + 30·(1 − area / hull area), clipped to 0–10"),
    "norm_color": (False, "2.5·(s − 0.8) clipped to 0–10, s = RMS over L*a*b* of the colour std in the lesion core"),
    "radial_color_std_max": (False, "largest std, over L*, a*, b*, of the mean colour of 8 angular sectors of the "
                                    "core, minus 0.3, clipped to 0–10"),
    "deltaB": (True, "B − Bext: mean b* inside minus mean b* of the outside skin"),
    "deltaL": (True, "L − Lext: mean L* inside minus mean L* of the outside skin"),
    "deltaLB": (False, "hypot of the L* and b* differences between the lesion and the first 1 mm ring of skin"),
    "stdLExt": (True, "standard deviation of L* over the outside skin"),
    "clin_size_long_diam_mm": (True, "largest distance between two contour points (maximum Feret diameter), mm"),
    "perimeterMM": (True, "length of the closed contour, mm"),
    "area_perim_ratio": (True, "perimeterMM² / areaMM2 (a circle gives 4π ≈ 12.6)"),
    "A": (True, "mean a* inside the lesion"),
    "Aext": (True, "mean a* of the outside skin (beyond a 0.5 mm guard band)"),
    "B": (True, "mean b* inside the lesion"),
    "Bext": (True, "mean b* of the outside skin (beyond a 0.5 mm guard band)"),
}
DEFINITIONS = {name: _DEFINITIONS[name] for name in attributes.NAMES}  # registry order; KeyError if one is missing
