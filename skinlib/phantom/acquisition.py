"""Acquisition nuisances, applied to the picture only and after measurement: hair, specular glints
(white-light tiles), uneven lighting, blur, sensor noise and JPEG at a varied quality."""
from __future__ import annotations

import io
import math

import numpy as np
from scipy import ndimage

from skinlib import color
from skinlib.phantom.fields import _blobs
from skinlib.phantom.patients import Patient
from skinlib.phantom.shape import FOV_MM


def _hair_alpha(rng, size: int, mmpp: float, n: int, c0, r_eq: float) -> tuple[np.ndarray, int]:
    """Anti-aliased opacity map of n thin curved hairs (quadratic Béziers drawn at 3x and
    box-downsampled); about a third pass through the lesion. Returns (alpha, n crossing)."""
    from PIL import Image, ImageDraw

    ss = 3
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    crossing = 0
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(n):
        length = rng.uniform(4.0, 22.0)
        phi = rng.uniform(0, np.pi)
        u = np.array([math.cos(phi), math.sin(phi)])
        if rng.random() < 0.35:
            mid = np.asarray(c0) + rng.normal(0, 0.4 * r_eq, 2)
            crossing += 1
        else:
            mid = rng.uniform(-2.0, FOV_MM + 2.0, 2)
        a, b = mid - u * length * rng.uniform(0.2, 0.8), None
        b = a + u * length
        bend = np.array([-u[1], u[0]]) * rng.normal(0, 0.15) * length
        ctrl = (a + b) / 2 + bend
        pts = (1 - t) ** 2 * a + 2 * t * (1 - t) * ctrl + t ** 2 * b
        pts = pts / mmpp * ss
        width = max(1, int(round(rng.uniform(0.45, 1.3) * ss)))
        draw.line([tuple(p) for p in pts], fill=int(255 * rng.uniform(0.45, 0.95)), width=width, joint="curve")
    alpha = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) * np.float32(1 / 255)
    return alpha, crossing


def _acquire(rng, rgb: np.ndarray, patient: Patient, mmpp: float, c0, r_eq: float):
    """Acquisition nuisances on the clean sRGB picture (float, (S, S, 3)); returns the uint8
    picture, its JPEG bytes and the nuisance facts. Never touches the measured rendering."""
    from PIL import Image

    size = rgb.shape[0]
    rgb = rgb.astype(np.float32)   # the picture ends as 8-bit: single precision is plenty, and faster
    facts = {}
    n_hairs = int(rng.poisson(patient.mean_hairs * rng.uniform(0.6, 1.4)))
    if n_hairs:
        alpha, crossing = _hair_alpha(rng, size, mmpp, n_hairs, c0, r_eq)
        hair = np.asarray(patient.hair_lab) + rng.normal(0, [3, 1, 2])
        hair_rgb = color.lab_to_srgb(hair).astype(np.float32)
        rgb += alpha[..., None] * (hair_rgb - rgb)
    else:
        crossing = 0
    facts.update(n_hairs=n_hairs, n_hairs_crossing=crossing,
                 hair_color="light" if patient.hair_lab[0] > 45 else "dark")
    n_spec = 0
    if patient.tile_type == "3D: white":   # white-light tiles show specular glints
        n_spec = int(rng.poisson(12))
        if n_spec:
            yx = rng.integers(0, size, (n_spec, 2))
            glint = _blobs(size, mmpp, yx, rng.uniform(0.05, 0.25, n_spec), 0.08)
            rgb = rgb + glint.astype(np.float32)[..., None] * (1 - rgb)
    facts["n_specular"] = n_spec
    grad = rng.uniform(0.0, 0.22)
    gang = rng.uniform(0, 2 * np.pi)
    vign = rng.uniform(0.0, 0.12)
    exposure = rng.normal(1.0, 0.04)
    coords = ((np.arange(size) + 0.5) / size - 0.5) * 2  # -1..1
    light = exposure * (1 + grad / 2 * (coords[None, :] * math.cos(gang) + coords[:, None] * math.sin(gang)))
    light = light * (1 - vign * (coords[None, :] ** 2 + coords[:, None] ** 2) / 2)
    rgb = rgb * light.astype(np.float32)[..., None]
    facts.update(light_gradient=float(grad), light_angle_deg=float(np.degrees(gang)),
                 vignetting=float(vign), exposure=float(exposure))
    blur = rng.uniform(0.35, 1.15)
    rgb = ndimage.gaussian_filter(rgb, sigma=(blur, blur, 0))
    facts["blur_sigma_px"] = float(blur)
    # sensor noise of 0.6 levels before the 8-bit rounding; uniform (sd 0.6), as cheap draws
    # matter on every pixel and the noise's shape is lost in the rounding and the JPEG
    noise = rng.random(rgb.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    rgb *= np.float32(255)
    rgb += np.float32(0.6 * math.sqrt(12)) * noise
    rgb8 = np.clip(np.round(rgb, out=rgb), 0, 255, out=rgb).astype(np.uint8)
    quality = int(rng.integers(65, 91))
    buf = io.BytesIO()
    Image.fromarray(rgb8, "RGB").save(buf, "JPEG", quality=quality, subsampling=2)
    facts["jpeg_quality"] = quality
    return rgb8, buf.getvalue(), facts
