"""Colour and texture: the clean L*a*b* rendering of one crop (skin texture, freckles, a
perilesional halo, the lesion's colour, variegation and gradient), each solved for its targets.
This rendering is what `skinlib.measure` measures; acquisition nuisances come after."""
from __future__ import annotations

import math

import numpy as np

from skinlib import measure
from skinlib.phantom.fields import _blobs, _noise_fields
from skinlib.phantom.patients import Patient
from skinlib.phantom.shape import _COS, _SIN, FOV_MM, _edge_index, _radius_along, polygon_radius_at, solve_shape


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _quad_root(a: float, b: float, c: float) -> float:
    """Largest real root of a x² + b x + c = 0 that is >= 0, else 0."""
    if a <= 1e-12:
        return max(-c / b, 0.0) if abs(b) > 1e-12 else 0.0
    disc = b * b - 4 * a * c
    if disc < 0:
        return 0.0
    return max((-b + math.sqrt(disc)) / (2 * a), 0.0)


def _skin_and_lesion(rng, t: dict, patient: Patient, size: int, mmpp: float):
    """Draw the clean L*a*b* rendering for targets t; returns (lab, mask, contour, facts)."""
    facts = {}
    # --- contour
    area_t = float(np.clip(t["areaMM2"], 0.3, 110.0))
    r_mm, shape_p = solve_shape(rng, area_t, t["minorAxisMM"], t["area_perim_ratio"], t["norm_border"], mmpp)
    facts.update(shape_p)
    c0 = FOV_MM / 2 + np.clip(rng.normal(0, 0.5, 2), -1.2, 1.2)   # drawing centre (x, y), mm
    coords = (np.arange(size) + 0.5) * mmpp
    dx, dy = coords[None, :] - c0[0], coords[:, None] - c0[1]
    rho = np.hypot(dx, dy)
    edge = _edge_index(np.arctan2(dy, dx))
    ux = np.divide(dx, rho, out=np.ones_like(rho), where=rho > 0)   # the pixels' directions
    uy = np.divide(dy, rho, out=np.zeros_like(rho), where=rho > 0)
    for _ in range(6):  # a big lesion must leave some skin in the crop
        rpoly = _radius_along(r_mm, edge, ux, uy)
        mask = rho < rpoly
        reg = measure.regions(mask, mmpp) if mask.any() and (~mask).sum() > 0.3 * mask.size else None
        if reg is not None and reg.ext.sum() >= 0.12 * mask.size and mask.any():
            break
        r_mm = r_mm * 0.9
    if reg is None:
        raise RuntimeError("could not fit the lesion in the field of view")
    d_sign = rpoly - rho            # radial distance to the border, > 0 inside
    contour = np.column_stack([c0[0] + r_mm * _COS, c0[1] + r_mm * _SIN])
    facts.update(lesion_center_x_mm=float(c0[0]), lesion_center_y_mm=float(c0[1]))

    # --- skin: texture, freckles, halo
    pores = rng.uniform(0.05, 0.09)
    tex_l, tex_a, tex_b = _noise_fields(rng, size, mmpp, (pores, 0.3, 1.6), patient.texture_mix, count=3)
    tex_a = -0.45 * tex_l + 0.9 * tex_a   # darker mottles are a little redder
    n_fr = rng.poisson(patient.freckle_density * FOV_MM ** 2)
    yx = rng.integers(0, size, (n_fr, 2))
    fr_x, fr_y = (yx[:, 1] + 0.5) * mmpp - c0[0], (yx[:, 0] + 0.5) * mmpp - c0[1]
    keep = np.hypot(fr_x, fr_y) > polygon_radius_at(r_mm, np.arctan2(fr_y, fr_x)) + 0.6
    yx = yx[keep]
    sig_fr = patient.freckle_sigma_mm * rng.uniform(0.8, 1.2)
    fr = _blobs(size, mmpp, yx, rng.uniform(0.3, 1.0, len(yx)), sig_fr) if len(yx) else np.zeros((size, size))
    facts.update(n_freckles=int(len(yx)), freckle_sigma_mm=float(sig_fr))
    halo = np.exp(-(((-d_sign) - 1.0) / 0.5) ** 2) * (d_sign < 0)

    ext, ring, inside, core = reg.ext, reg.ring, reg.inside, reg.core
    std_t = max(t["stdLExt"], 0.3)
    fr_depth = rng.uniform(3.0, 8.0) if len(yx) else 0.0
    fr_l = -fr_depth * fr
    v_fr = fr_l[ext].var()
    if v_fr > 0.5 * std_t ** 2:     # freckles may not explain the whole skin variation
        fr_l *= math.sqrt(0.5 * std_t ** 2 / v_fr)
        fr_depth *= math.sqrt(0.5 * std_t ** 2 / v_fr)
    facts["freckle_depth_L"] = float(fr_depth)
    L_in, B_in = t["Lext"] + t["deltaL"], t["Bext"] + t["deltaB"]
    skin_b = 0.3 * std_t * tex_b + 0.4 * fr_depth * fr
    b_ring_off = skin_b[ring].mean() - skin_b[ext].mean()

    def ring_minus_ext(a):
        return a[ring].mean() - a[ext].mean()

    def cov(a, b):   # population covariance over ext; a is centred
        return float(np.dot(a, b)) / a.size

    # the skin's L* is s * tex_l + fr_l + h * halo: its std over ext and its ring contrast are
    # linear / quadratic in (s, h), so the coupled solve below runs on a few precomputed sums
    tl_e, fr_e, ha_e = tex_l[ext], fr_l[ext], halo[ext]
    tl_e = tl_e - tl_e.mean()
    fr_c, ha_c = fr_e - fr_e.mean(), ha_e - ha_e.mean()
    v_tl, v_fl, v_ha, c_fl_ha = cov(tl_e, tl_e), cov(fr_c, fr_c), cov(ha_c, ha_c), cov(fr_c, ha_c)
    c_tl_fr, c_tl_ha = cov(tl_e, fr_e), cov(tl_e, ha_e)
    d_tl, d_fr, kappa = ring_minus_ext(tex_l), ring_minus_ext(fr_l), ring_minus_ext(halo)
    h, s = 0.0, std_t
    for _ in range(3):  # texture strength s for stdLExt, halo h for deltaLB (coupled, 3 rounds)
        var_y = v_fl + 2 * h * c_fl_ha + h * h * v_ha        # y = fr_l + h * halo over ext
        s = _quad_root(v_tl, 2 * (c_tl_fr + h * c_tl_ha), var_y - std_t ** 2)
        d0 = s * d_tl + d_fr                                  # ring contrast of s * tex_l + fr_l
        rhs = t["deltaLB"] ** 2 - (t["deltaB"] - b_ring_off) ** 2
        dl = t["deltaL"] - d0
        h = float(np.clip((dl + math.sqrt(max(rhs, 0.0))) / kappa, -3.0, 3.0)) if kappa > 1e-6 and rhs > 0 else 0.0
    skin_l = s * tex_l + fr_l + h * halo
    skin_l += t["Lext"] - skin_l[ext].mean()
    skin_a = 0.45 * s * tex_a + 0.25 * fr_depth * fr
    skin_a += t["Aext"] - skin_a[ext].mean()
    skin_b += t["Bext"] - skin_b[ext].mean()
    facts.update(skin_texture_L=float(s), halo_L=float(h), pore_scale_mm=float(pores))

    # --- lesion colour: variation fields in the core, then the means
    r_eq = math.sqrt(area_t / math.pi)
    sv = float(np.clip(0.09 * r_eq, 0.1, 0.5))
    # fine variegation (scale sv) barely moves the sector means: it sets norm_color; the
    # asymmetric part (a linear gradient plus blotches on the lesion's scale) sets the radial std
    v1, v2, v3 = _noise_fields(rng, size, mmpp, (sv, 0.5 * sv), (1.0, 0.5), count=3)
    (blot,) = _noise_fields(rng, size, mmpp, (1.2 * r_eq,), count=1)
    ang = rng.uniform(0, 2 * np.pi)
    grad = (dx * math.cos(ang) + dy * math.sin(ang)) / max(r_eq, 0.3) + 0.5 * blot
    tau = 0.3  # share of the skin texture that shows through the lesion
    base = [tau * (skin_l - t["Lext"]), tau * (skin_a - t["Aext"]), tau * (skin_b - t["Bext"])]
    var_f = [v1, -0.15 * v1 + 0.3 * v2, 0.4 * v1 + 0.2 * v3]  # variegation per channel
    grd_f = [grad, -0.2 * grad, 0.4 * grad]                 # colour gradient per channel
    v, g = _solve_variation(core, base, var_f, grd_f, t["norm_color"], t["radial_color_std_max"])
    facts.update(variegation=float(v), variegation_scale_mm=float(sv), color_gradient=float(g),
                 color_gradient_angle_deg=float(np.degrees(ang) % 360))
    e_in = rng.uniform(0.08, min(0.25, measure.CORE_MM - 0.72 * mmpp))
    e_out = rng.uniform(0.1, measure.GUARD_MM - 0.72 * mmpp)
    alpha = _smoothstep((d_sign + e_out) / (e_in + e_out))
    facts["edge_width_mm"] = float(e_in + e_out)
    lab = np.empty((size, size, 3))
    for ch, (skin, tgt) in enumerate(zip((skin_l, skin_a, skin_b), (L_in, t["A"], B_in))):
        w = base[ch] + v * var_f[ch] + g * grd_f[ch]
        a_in = alpha[inside]
        c = (tgt - ((1 - a_in) * skin[inside]).mean() - (a_in * w[inside]).mean()) / a_in.mean()
        lab[..., ch] = (1 - alpha) * skin + alpha * (c + w)
    return lab, mask, contour, facts, reg


def _solve_variation(core, base, var_f, grd_f, nc_t: float, rad_t: float) -> tuple[float, float]:
    """Variegation strength v and gradient strength g so that the core colour std and the
    sector-mean std (see skinlib.measure) hit norm_color and radial_color_std_max."""
    if core.sum() < measure.MIN_CORE_PX or nc_t <= 0:
        return 0.0, 0.0
    s_t = measure.NORM_COLOR_DEADZONE + nc_t / measure.NORM_COLOR_SCALE
    yy, xx = np.nonzero(core)
    ang = np.arctan2(yy - yy.mean(), xx - xx.mean())
    idx = np.minimum(((ang + np.pi) / (2 * np.pi) * measure.N_SECTORS).astype(int), measure.N_SECTORS - 1)
    cnt = np.bincount(idx, minlength=measure.N_SECTORS).astype(float)
    ok = cnt >= measure.MIN_SECTOR_PX
    # quadratic form of the core variance, and sector means, per channel
    Q = np.zeros((3, 3))
    sect = []
    for b, vf, gf in zip(base, var_f, grd_f):
        m = np.stack([b[core], vf[core], gf[core]])
        mc = m - m.mean(axis=1, keepdims=True)
        Q += (mc @ mc.T) / (3.0 * m.shape[1])   # the (biased) covariance, as np.cov(bias=True)
        sect.append(np.stack([np.bincount(idx, weights=row, minlength=measure.N_SECTORS)[ok] / cnt[ok] for row in m]))

    S = np.stack(sect)  # (channel, term, sector)
    # the across-sector variance of channel c is w' G[c] w with w = (1, v, g): the bisection
    # below then costs a few float operations per step instead of array reductions
    Sc = S - S.mean(axis=2, keepdims=True)
    G = (np.einsum("cis,cjs->cij", Sc, Sc) / max(S.shape[2], 1)).tolist()

    def v_for(g):   # s(v, g)² = s_t²
        return _quad_root(Q[1, 1], 2 * (Q[0, 1] + g * Q[1, 2]), Q[0, 0] + 2 * g * Q[0, 2] + g * g * Q[2, 2] - s_t ** 2)

    def radial(v, g):
        if ok.sum() < 4:
            return 0.0
        var = max(c[0][0] + v * v * c[1][1] + g * g * c[2][2] + 2 * (v * c[0][1] + g * c[0][2] + v * g * c[1][2])
                  for c in G)
        return math.sqrt(max(var, 0.0)) - measure.RADIAL_DEADZONE

    if rad_t <= 0:
        return v_for(0.0), 0.0
    lo, hi = 0.0, 1.0
    while radial(v_for(hi), hi) < rad_t and hi < 64:
        hi *= 2
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        if radial(v_for(mid), mid) < rad_t:
            lo = mid
        else:
            hi = mid
    g = 0.5 * (lo + hi)
    return v_for(g), g
