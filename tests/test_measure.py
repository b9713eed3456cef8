"""The measured attributes on shapes and colours whose values are known in closed form."""
import math

import numpy as np
import pytest

from skinlib import color, measure


def ellipse(a, b, n=4000, cx=0.0, cy=0.0, phi=0.0):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(phi), math.sin(phi)
    return np.column_stack([cx + c * x - s * y, cy + s * x + c * y])


def test_circle():
    att = measure.shape_attributes(ellipse(2.0, 2.0))
    assert att["areaMM2"] == pytest.approx(math.pi * 4, rel=1e-5)
    assert att["perimeterMM"] == pytest.approx(4 * math.pi, rel=1e-5)
    assert att["area_perim_ratio"] == pytest.approx(4 * math.pi, rel=1e-5)
    assert att["minorAxisMM"] == pytest.approx(4.0, rel=1e-5)
    assert att["clin_size_long_diam_mm"] == pytest.approx(4.0, rel=1e-5)
    assert att["norm_border"] == pytest.approx(0.0, abs=1e-6)   # convex: no irregularity


def test_rotated_shifted_ellipse_axes_and_feret():
    c = ellipse(3.0, 1.0, cx=5, cy=-2, phi=0.7)
    assert measure.minor_axis(c) == pytest.approx(2.0, rel=1e-5)
    assert measure.equivalent_ellipse_axes(c)[0] == pytest.approx(6.0, rel=1e-5)
    assert measure.max_feret(c) == pytest.approx(6.0, rel=1e-5)
    assert measure.eccentricity(c) == pytest.approx(math.sqrt(1 - 1 / 9), rel=1e-5)


def test_square_moments_and_area_perim_ratio():
    sq = np.array([[0, 0], [2, 0], [2, 2], [0, 2]], float)
    assert measure.polygon_area(sq) == 4.0
    assert measure.polygon_perimeter(sq) == 8.0
    assert measure.area_perim_ratio(sq) == 16.0
    # a 2x2 square has variance 1/3 along each axis: equivalent ellipse axis 4*sqrt(1/3)
    assert measure.minor_axis(sq) == pytest.approx(4 / math.sqrt(3))
    assert measure.max_feret(sq) == pytest.approx(2 * math.sqrt(2))


def test_norm_border_grows_with_notches():
    star = []
    for k in range(10):
        r = 2.0 if k % 2 == 0 else 1.5  # below 2·cos 36° = 1.62: a notch
        star.append([r * math.cos(k * math.pi / 5), r * math.sin(k * math.pi / 5)])
    deep = [[p[0] * (0.6 if k % 2 else 1), p[1] * (0.6 if k % 2 else 1)] for k, p in enumerate(star)]
    shallow_score, deep_score = measure.norm_border(np.array(star)), measure.norm_border(np.array(deep))
    assert 0 < shallow_score < deep_score <= 10


def test_bad_contour_is_refused():
    with pytest.raises(ValueError, match="contour"):
        measure.polygon_area(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        measure.polygon_area(np.array([[0, 0], [1, np.nan], [1, 1]]))


def two_tone(size=120, mmpp=0.125, inside=(40.0, 20.0, 25.0), outside=(60.0, 12.0, 20.0), r_mm=3.0):
    yy, xx = np.mgrid[:size, :size]
    c = (size / 2) * mmpp
    rho = np.hypot((xx + 0.5) * mmpp - c, (yy + 0.5) * mmpp - c)
    mask = rho < r_mm
    lab = np.where(mask[..., None], np.array(inside), np.array(outside))
    return lab, mask, mmpp


def test_uniform_colours_give_exact_means_and_zero_variation():
    lab, mask, mmpp = two_tone()
    m = measure.color_measures(lab, mask, mmpp)
    assert (m["A"], m["B"], m["Aext"], m["Bext"]) == pytest.approx((20, 25, 12, 20))
    assert m["deltaL"] == pytest.approx(-20) and m["deltaB"] == pytest.approx(5)
    assert m["deltaLB"] == pytest.approx(math.hypot(20, 5))
    assert m["stdLExt"] == pytest.approx(0, abs=1e-9)
    assert m["norm_color"] == 0 and m["radial_color_std_max"] == 0


def test_colour_variation_scores_follow_their_definitions():
    lab, mask, mmpp = two_tone()
    rng = np.random.default_rng(0)
    noisy = lab + mask[..., None] * rng.normal(0, 3.0, lab.shape)     # fine noise: variation, no asymmetry
    m = measure.color_measures(noisy, mask, mmpp)
    assert m["norm_color"] == pytest.approx(2.5 * (3.0 - 0.8), abs=0.3)
    assert m["radial_color_std_max"] < 0.3
    xx = np.arange(lab.shape[1])[None, :].repeat(lab.shape[0], 0)
    ramp = lab.copy()
    ramp[..., 0] += mask * (xx - xx[mask].mean()) * 0.4                 # one side darker: asymmetry
    r = measure.color_measures(ramp, mask, mmpp)
    assert r["radial_color_std_max"] > 2.0
    # and deltaL ignores where the colour is, only its mean
    assert r["deltaL"] == pytest.approx(m["deltaL"], abs=0.5)


def test_regions_are_nested_and_guarded():
    lab, mask, mmpp = two_tone()
    reg = measure.regions(mask, mmpp)
    assert not (reg.core & ~reg.inside).any() and not (reg.ring & ~reg.ext).any()
    assert not (reg.ext & reg.inside).any()
    with pytest.raises(ValueError, match="empty"):
        measure.regions(np.zeros_like(mask), mmpp)


def test_lab_round_trip():
    rgb = np.random.default_rng(1).random((50, 3))
    assert np.allclose(color.lab_to_srgb(color.srgb_to_lab(rgb)), rgb, atol=1e-6)
    assert color.srgb_to_lab(np.array([1.0, 1.0, 1.0])) == pytest.approx([100, 0, 0], abs=1e-3)


def test_lab_to_srgb_follows_the_standard_matrices():
    """lab -> XYZ (D65 white of sRGB) -> linear sRGB by the inverse IEC matrix -> transfer curve."""
    lab = np.random.default_rng(2).random((7, 9, 3)) * [100, 200, 200] - [0, 100, 100]
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * color.WHITE
    lin = xyz @ np.linalg.inv(color._M).T
    expect = np.sign(lin) * np.where(np.abs(lin) <= 0.0031308, 12.92 * np.abs(lin),
                                     1.055 * np.abs(lin) ** (1 / 2.4) - 0.055)
    assert np.allclose(color.lab_to_srgb(lab, clip=False), expect, rtol=1e-12, atol=1e-12)
    assert np.allclose(color.lab_to_srgb(lab), np.clip(expect, 0, 1), rtol=1e-12, atol=1e-12)
