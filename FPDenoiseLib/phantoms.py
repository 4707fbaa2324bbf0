"""Procedural CT / X-ray phantoms: redistributable training and test data, no download.

Every phantom takes a seed, so the same call gives the same image on every machine.

>>> from FPDenoiseLib.phantoms import synthetic_ct_slice, synthetic_xray
>>> synthetic_ct_slice("chest", size=64, seed=0).shape
(64, 64)
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .data import SeedLike, _rng
from .errors import InputError

__all__ = ["synthetic_ct_slice", "synthetic_ct_volume", "synthetic_xray"]


def _field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth Gaussian random field, zero mean, unit std, correlation length ~``sigma`` px."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


class _Canvas:
    """Normalised coordinates: x, y in [-1, 1] (y grows downward = posterior / inferior)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.n = size
        self.rng = rng
        c = (np.arange(size) + 0.5) / size * 2 - 1
        self.y, self.x = np.meshgrid(c, c, indexing="ij")
        self.px = 2.0 / size  # one pixel in normalised units
        self._warp = _field((size, size), size / 24, rng)

    def ellipse(
        self, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0, warp: float = 0.0
    ) -> np.ndarray:
        """Boolean ellipse whose boundary is perturbed by a smooth field (``warp`` ~ relative)."""
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u, v = (ca * dx + sa * dy) / rx, (-sa * dx + ca * dy) / ry
        r = u * u + v * v
        if warp:
            r = r * (1 + warp * self._warp)
        return r < 1.0

    def dist(self, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> np.ndarray:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u, v = (ca * dx + sa * dy) / rx, (-sa * dx + ca * dy) / ry
        return np.sqrt(u * u + v * v)

    def tree(
        self, mask: np.ndarray, roots: list[tuple[float, float]], n_branches: int, width_px: float
    ) -> np.ndarray:
        """Soft map (0..1) of random branching vessels that start at ``roots`` and stay in ``mask``."""
        from skimage.draw import line

        rng, n = self.rng, self.n
        out = np.zeros((n, n), dtype=np.float32)
        for _ in range(n_branches):
            ry, rx = roots[int(rng.integers(len(roots)))]
            y, x = (ry + 1) / 2 * n, (rx + 1) / 2 * n
            ang = rng.uniform(0, 2 * math.pi)
            w = width_px * rng.uniform(0.6, 1.3)
            for _step in range(int(rng.integers(6, 16))):
                ang += rng.normal(0, 0.35)
                length = rng.uniform(0.02, 0.06) * n
                y2, x2 = y + length * math.sin(ang), x + length * math.cos(ang)
                if not (0 <= y2 < n and 0 <= x2 < n) or not mask[int(y2), int(x2)]:
                    ang += math.pi / 2
                    continue
                seg = np.zeros((n, n), dtype=bool)
                rr, cc = line(int(y), int(x), int(y2), int(x2))
                seg[rr, cc] = True
                rad = max(w / 2, 0.5)
                d = ndimage.distance_transform_edt(~seg)
                out = np.maximum(out, np.clip(rad + 0.5 - d, 0, 1))
                y, x, w = y2, x2, w * 0.9
        return out * mask


def _bone(m: np.ndarray, cortex_px: float, rng: np.random.Generator, hu: np.ndarray) -> None:
    """Cortical shell (1000-1800 HU) around trabecular interior (~300 HU with texture)."""
    inner = ndimage.binary_erosion(m, iterations=max(1, int(round(cortex_px))))
    tex = _field(m.shape, 1.2, rng)
    hu[m] = rng.uniform(1000, 1800) + 120 * tex[m]
    hu[inner] = rng.uniform(220, 380) + 60 * tex[inner]


def _lung_texture(cv: _Canvas, lung: np.ndarray, hu: np.ndarray, rng: np.random.Generator) -> None:
    n = cv.n
    hu[lung] = -850 + 45 * _field((n, n), 1.5, rng)[lung] + 25 * _field((n, n), n / 20, rng)[lung]


def synthetic_ct_slice(kind: str = "chest", size: int = 256, seed: SeedLike = None) -> np.ndarray:
    """A procedural axial CT slice in HU, ``(size, size)`` float32.

    ``kind`` is "head", "chest" or "abdomen". Tissues have realistic densities (air -1000, lung
    -850 +- 60 with vessels and bronchi, fat -100, muscle / soft tissue ~40, liver ~60, contrast
    vessels 150-300, cortical bone 1000-1800 around ~300 HU trabecular bone, brain GM / WM 40 / 25,
    CSF 5), smooth random organ shapes, fine tissue texture, sharp boundaries and small
    high-contrast details (vessels, nodules, calcifications), blurred by a ~0.6 px PSF.
    Layout varies with ``seed``; it is an anatomical caricature, not an atlas.

    >>> hu = synthetic_ct_slice("chest", size=128, seed=0)
    >>> hu.dtype, bool(hu.min() < -900), bool(hu.max() > 700)
    (dtype('float32'), True, True)
    """
    kinds = {"head": _ct_head, "chest": _ct_chest, "abdomen": _ct_abdomen}
    if kind not in kinds:
        raise InputError(f"unknown phantom kind {kind!r} (choose from {', '.join(kinds)})")
    if size < 32:
        raise InputError(f"phantom size must be >= 32 (got {size})")
    rng = _rng(seed)
    cv = _Canvas(int(size), rng)
    hu = kinds[kind](cv, rng)
    hu = ndimage.gaussian_filter(hu, 0.6)  # scanner PSF: partial-volume edges, still sharp
    return np.clip(hu, -1024, 3071).astype(np.float32)


def _soft(cv: _Canvas, rng: np.random.Generator, mean: float, amp: float = 8.0) -> np.ndarray:
    n = cv.n
    return mean + amp * (0.7 * _field((n, n), 1.3, rng) + 0.7 * _field((n, n), n / 30, rng))


def _body_common(cv: _Canvas, rng: np.random.Generator, ry: float, rx: float, fat_frac: float):
    n = cv.n
    hu = np.full((n, n), -1000.0) + 3 * rng.standard_normal((n, n))  # air (with a trace of texture)
    cy = rng.uniform(-0.04, 0.04)
    body = cv.ellipse(cy, 0.0, ry, rx, rng.uniform(-0.05, 0.05), warp=0.04)
    fat = _soft(cv, rng, -100, 10)
    hu[body] = fat[body]
    muscle = cv.ellipse(cy, 0.0, ry * (1 - fat_frac), rx * (1 - fat_frac), 0, warp=0.05)
    hu[muscle] = _soft(cv, rng, 45, 8)[muscle]
    # skin: thin dense rim
    skin = body & ~ndimage.binary_erosion(body, iterations=max(1, n // 200))
    hu[skin] = 30
    # patient table below the body
    ty = cy + ry + 0.06
    table = (np.abs(cv.y - (ty + 0.04 * cv.x**2)) < 0.012) & (np.abs(cv.x) < 0.9)
    hu[table] = 250
    return hu, body, muscle, cy


def _ct_chest(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    ry, rx = rng.uniform(0.5, 0.62), rng.uniform(0.8, 0.92)
    hu, body, muscle, cy = _body_common(cv, rng, ry, rx, rng.uniform(0.06, 0.14))
    inner_ry, inner_rx = ry * 0.78, rx * 0.8
    # lungs
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lung = cv.ellipse(
            cy - 0.02,
            side * inner_rx * 0.5,
            inner_ry * rng.uniform(0.85, 0.95),
            inner_rx * rng.uniform(0.4, 0.47),
            side * rng.uniform(0.0, 0.2),
            warp=0.08,
        )
        lungs |= lung
    med = cv.ellipse(cy + 0.02, rng.uniform(-0.05, 0.05), inner_ry * 0.75, inner_rx * 0.22, 0, warp=0.05)
    spine_c = (cy + ry * 0.72, 0.0)
    spine_zone = cv.ellipse(spine_c[0], 0.0, 0.16, 0.14)
    lungs &= ~med & ~spine_zone & muscle
    _lung_texture(cv, lungs, hu, rng)
    # pulmonary vessels (soft tissue density) and bronchi
    hila = [(cy, -0.12), (cy, 0.12)]
    ves = cv.tree(lungs, hila, 12, max(1.0, cv.n / 110))
    hu = hu * (1 - ves) + (40 + 20 * rng.random()) * ves
    for _ in range(int(rng.integers(3, 7))):  # bronchi: air lumen with a soft-tissue wall
        ys, xs = np.nonzero(lungs)
        k = int(rng.integers(len(ys)))
        r = rng.uniform(1.5, 4.0) * cv.px
        d = cv.dist(cv.y[ys[k], xs[k]], cv.x[ys[k], xs[k]], r, r * rng.uniform(0.7, 1.3))
        hu[(d < 1.6) & (d >= 1.0) & lungs] = 20
        hu[(d < 1.0) & lungs] = -960
    for _ in range(int(rng.integers(0, 3))):  # nodules
        ys, xs = np.nonzero(lungs)
        k = int(rng.integers(len(ys)))
        r = rng.uniform(2, 7) * cv.px
        nod = cv.ellipse(cv.y[ys[k], xs[k]], cv.x[ys[k], xs[k]], r, r * rng.uniform(0.8, 1.2), warp=0.2)
        hu[nod] = rng.uniform(20, 60)
    # mediastinum: heart with contrast-filled chambers, aorta, fat
    hu[med] = _soft(cv, rng, -90, 10)[med]
    hcx = rng.uniform(0.02, 0.12)
    heart = cv.ellipse(cy + 0.05, hcx, inner_ry * 0.45, inner_rx * 0.3, rng.uniform(-0.5, -0.2), warp=0.04)
    hu[heart & muscle] = _soft(cv, rng, 45, 6)[heart & muscle]
    contrast = rng.uniform(150, 300)
    for _ in range(2):
        ch = (
            cv.ellipse(
                cy + 0.05 + rng.uniform(-0.06, 0.06),
                hcx + rng.uniform(-0.08, 0.08),
                inner_ry * 0.15,
                inner_rx * 0.1,
                rng.uniform(0, 3),
                warp=0.1,
            )
            & heart
        )
        hu[ch] = contrast + 8 * _field(ch.shape, 2, rng)[ch]
    for ay, ax, r in ((cy - inner_ry * 0.35, -0.02, 0.06), (spine_c[0] - 0.17, 0.07, 0.05)):
        ao = cv.ellipse(ay, ax, r * 0.95, r) & muscle
        hu[ao] = contrast + 10 * rng.standard_normal()
        wall = ao & ~ndimage.binary_erosion(ao, iterations=1)
        hu[wall & (rng.random() < 0.3)] = 600  # occasional calcified wall
    # spine: vertebral body + canal + posterior elements
    vb = cv.ellipse(spine_c[0], 0.0, 0.09, 0.1, 0, warp=0.03)
    _bone(vb, max(1, cv.n / 128), rng, hu)
    canal = cv.ellipse(spine_c[0] + 0.14, 0.0, 0.045, 0.04)
    post = cv.ellipse(spine_c[0] + 0.15, 0.0, 0.1, 0.13) & ~canal & ~vb & body
    _bone(post & ~cv.ellipse(spine_c[0] + 0.15, 0.0, 0.06, 0.09), 1, rng, hu)
    hu[canal] = 20
    # ribs around the chest wall, sternum in front
    for ang in np.linspace(0.25, math.pi - 0.25, int(rng.integers(8, 12))):
        for side in (-1, 1):
            a = ang + rng.normal(0, 0.05)  # angle from anterior midline
            py = cy - ry * 0.86 * math.cos(a)
            px = side * rx * 0.86 * math.sin(a)
            rib = cv.ellipse(py, px, 0.028, 0.045, a * side, warp=0.05)
            _bone(rib, 1, rng, hu)
    st = cv.ellipse(cy - ry * 0.9, 0.0, 0.035, 0.08, 0, warp=0.05)
    _bone(st, 1, rng, hu)
    return hu


def _ct_abdomen(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    ry, rx = rng.uniform(0.55, 0.68), rng.uniform(0.78, 0.92)
    hu, body, muscle, cy = _body_common(cv, rng, ry, rx, rng.uniform(0.08, 0.2))
    iry, irx = ry * 0.82, rx * 0.82
    cavity = cv.ellipse(cy - 0.02, 0.0, iry, irx, 0, warp=0.05)
    hu[cavity] = _soft(cv, rng, -95, 12)[cavity]  # visceral fat between organs
    contrast = rng.uniform(150, 260)
    # liver (image left = patient right) with enhancing vessels, occasional lesion
    liver = (
        cv.ellipse(cy - 0.1, -irx * 0.45, iry * 0.75, irx * 0.5, rng.uniform(-0.3, 0.2), warp=0.12) & cavity
    )
    hu[liver] = _soft(cv, rng, rng.uniform(55, 70), 6)[liver]
    lv = cv.tree(liver, [(cy - 0.05, -irx * 0.25)], 8, max(1.0, cv.n / 90))
    hu = hu * (1 - lv) + (contrast * 0.8) * lv
    if rng.random() < 0.6:
        ys, xs = np.nonzero(liver)
        k = int(rng.integers(len(ys)))
        les = cv.ellipse(cv.y[ys[k], xs[k]], cv.x[ys[k], xs[k]], 0.05, 0.06, 0, warp=0.2) & liver
        hu[les] = rng.uniform(10, 35)
    spleen = cv.ellipse(cy + 0.05, irx * 0.6, iry * 0.35, irx * 0.22, 0.6, warp=0.1) & cavity
    hu[spleen] = _soft(cv, rng, 50, 6)[spleen]
    # spine, psoas, aorta, IVC, kidneys
    sy = cy + iry * 0.62
    for side in (-1, 1):
        ps = cv.ellipse(sy + 0.02, side * 0.2, 0.09, 0.07, side * 0.3, warp=0.05) & cavity
        hu[ps] = _soft(cv, rng, 50, 6)[ps]
        kid = cv.ellipse(sy - 0.08, side * 0.38, 0.13, 0.08, side * -0.4, warp=0.06) & cavity & ~liver
        hu[kid] = contrast * 0.9 + 8 * _field(kid.shape, 2, rng)[kid]
        med = cv.ellipse(sy - 0.08, side * 0.38, 0.07, 0.035, side * -0.4, warp=0.2) & kid
        hu[med] = contrast * 0.55
    ao = cv.ellipse(sy - 0.18, 0.06, 0.045, 0.045)
    hu[ao] = contrast + 10 * rng.standard_normal()
    ivc = cv.ellipse(sy - 0.17, -0.12, 0.04, 0.06, 0, warp=0.05)
    hu[ivc] = contrast * 0.7
    vb = cv.ellipse(sy, 0.0, 0.1, 0.11, 0, warp=0.03)
    _bone(vb, max(1, cv.n / 128), rng, hu)
    canal = cv.ellipse(sy + 0.15, 0.0, 0.05, 0.045)
    post = cv.ellipse(sy + 0.16, 0.0, 0.1, 0.14) & ~canal & ~vb & body
    _bone(post & ~cv.ellipse(sy + 0.17, 0.0, 0.06, 0.1), 1, rng, hu)
    hu[canal] = 20
    # bowel loops: soft wall, fluid or gas content (some with air-fluid level)
    free = cavity & ~liver & ~spleen & ~cv.ellipse(sy, 0, 0.25, 0.5)
    for _ in range(int(rng.integers(6, 12))):
        ys, xs = np.nonzero(free)
        if len(ys) == 0:
            break
        k = int(rng.integers(len(ys)))
        r = rng.uniform(0.03, 0.08)
        by, bx = cv.y[ys[k], xs[k]], cv.x[ys[k], xs[k]]
        loop = cv.ellipse(by, bx, r, r * rng.uniform(0.7, 1.4), rng.uniform(0, 3), warp=0.1) & free
        lumen = ndimage.binary_erosion(loop, iterations=max(1, cv.n // 128))
        hu[loop] = 40
        kind = rng.random()
        if kind < 0.35:
            hu[lumen] = -1000 + 10 * rng.standard_normal()
        elif kind < 0.6:
            hu[lumen] = 10
            hu[lumen & (cv.y < by)] = -1000  # air-fluid level
        else:
            hu[lumen] = rng.uniform(10, 40) + 6 * _field(loop.shape, 2, rng)[lumen]
        free &= ~loop
    # lower ribs laterally
    for side in (-1, 1):
        for a in rng.uniform(0.6, 1.4, size=2):
            rib = cv.ellipse(
                cy + math.cos(a) * ry * 0.85 * 0.3,
                side * rx * 0.87 * math.sin(a),
                0.03,
                0.05,
                side * a,
                warp=0.05,
            )
            _bone(rib & body, 1, rng, hu)
    return hu


def _ct_head(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    n = cv.n
    hu = np.full((n, n), -1000.0) + 3 * rng.standard_normal((n, n))
    ry, rx = rng.uniform(0.78, 0.9), rng.uniform(0.62, 0.74)
    cy = rng.uniform(-0.03, 0.03)
    scalp = cv.ellipse(cy, 0, ry, rx, rng.uniform(-0.06, 0.06), warp=0.02)
    hu[scalp] = _soft(cv, rng, 30, 10)[scalp]
    t = rng.uniform(0.05, 0.08)
    skull = cv.ellipse(cy, 0, ry - 0.04, rx - 0.04, 0, warp=0.02)
    _bone(skull, max(1, n / 170), rng, hu)
    # diploe of the skull: brighter than trabecular bone elsewhere
    brain = cv.ellipse(cy, 0, ry - 0.04 - t, rx - 0.04 - t, 0, warp=0.02)
    dip = skull & ~brain & ndimage.binary_erosion(skull & ~brain, iterations=max(1, n // 170))
    hu[dip] = rng.uniform(450, 750) + 80 * _field((n, n), 1.5, rng)[dip]
    # CSF rim, then GM ribbon folded by a thresholded random field (gyri), WM core
    hu[brain] = 5
    inner = ndimage.binary_erosion(brain, iterations=max(1, n // 110))
    gyri = _field((n, n), n / 40, rng)
    dist_in = ndimage.distance_transform_edt(inner) / n
    wm = inner & (dist_in + 0.02 * gyri > rng.uniform(0.045, 0.065))
    sulci = inner & ~wm & (_field((n, n), n / 60, rng) > 1.2)
    hu[inner] = _soft(cv, rng, 40, 3)[inner]
    hu[wm] = _soft(cv, rng, 26, 2.5)[wm]
    hu[sulci] = 6
    # deep grey nuclei, ventricles, falx, occasional calcification
    for side in (-1, 1):
        bg = cv.ellipse(cy + 0.05, side * 0.16, 0.1, 0.05, side * 0.3, warp=0.1) & wm
        hu[bg] = 38
        vent = cv.ellipse(
            cy - 0.05 + rng.uniform(-0.05, 0.05), side * 0.07, 0.2, 0.045, side * -0.15, warp=0.15
        )
        hu[vent & inner] = 5 + 2 * rng.standard_normal()
        if rng.random() < 0.7:  # choroid plexus calcification
            cal = cv.ellipse(cy + 0.08, side * 0.09, 0.015, 0.012)
            hu[cal & inner] = rng.uniform(120, 300)
    falx = (np.abs(cv.x - 0.004 * cv.y) < 0.6 * cv.px + 0.003) & inner & (np.abs(cv.y - cy) > 0.25)
    hu[falx] = 60
    return hu


def synthetic_ct_volume(
    kind: str = "chest", n_slices: int = 8, size: int = 256, seed: SeedLike = None
) -> np.ndarray:
    """A ``(z, y, x)`` float32 HU volume of one phantom anatomy, coherent along z.

    Every slice is the same phantom layout (one seed) under a slow zoom / shift (organs grow and
    move a little from slice to slice), plus fresh per-slice fine texture so neighbouring slices
    are similar but not identical, as in a real CT series.

    >>> synthetic_ct_volume("chest", n_slices=2, size=64, seed=0).shape
    (2, 64, 64)
    """
    rng = _rng(seed)
    base = int(rng.integers(2**31))
    out = np.empty((n_slices, size, size), dtype=np.float32)
    for z in range(n_slices):
        # identical layout (same seed) with a slow zoom: consecutive slices are coherent
        img = synthetic_ct_slice(kind, size, base)
        zoom = 1.0 + 0.015 * (z - n_slices / 2)
        shift_px = 0.5 * (z - n_slices / 2)
        m = np.array([[1 / zoom, 0], [0, 1 / zoom]])
        c = np.array([size / 2, size / 2])
        off = c - m @ c + np.array([shift_px, 0])
        out[z] = ndimage.affine_transform(img, m, offset=off, order=1, mode="nearest")
        # fresh fine texture per slice so slices are not identical copies
        t = ndimage.gaussian_filter(np.random.default_rng(base + z + 1).standard_normal((size, size)), 1.2)
        out[z] += (4.0 / (t.std() + 1e-9)) * t * (out[z] > -500)
    return np.clip(out, -1024, 3071)


def synthetic_xray(size: int = 256, seed: SeedLike = None) -> np.ndarray:
    """A procedural PA chest radiograph, ``(size, size)`` float32 in 12-bit-like "counts"
    (about 100..4000, bone / mediastinum bright as in processed MONOCHROME2 radiographs).

    Built as a projection: pixel value is linear in the attenuation line integral through a body
    (ellipsoidal thickness), minus air in the lung fields, plus heart / mediastinum / diaphragm,
    spine, clavicles and posterior ribs (tubular bone: bright cortical edges), pulmonary vessels;
    direct exposure outside the body is dark, with collimator edges.

    >>> xr = synthetic_xray(128, seed=0)
    >>> xr.shape, bool(xr.max() - xr.min() > 1500)
    ((128, 128), True)
    """
    if size < 32:
        raise InputError(f"phantom size must be >= 32 (got {size})")
    rng = _rng(seed)
    cv = _Canvas(int(size), rng)
    n = cv.n
    mu_soft, mu_bone = 1.0, 2.6
    # body thickness: an elliptic cylinder seen from the front (shoulders wider at the top)
    rx = rng.uniform(0.78, 0.9) * (1 + 0.08 * (cv.y < -0.6))
    body_t = np.sqrt(np.clip(1 - (cv.x / rx) ** 2, 0, None))
    body_t *= cv.y > rng.uniform(-1.0, -0.92)
    neck = (np.abs(cv.x) < 0.2) | (cv.y > -0.82)
    body_t *= neck
    proj = mu_soft * body_t * (1 + 0.04 * _field((n, n), n / 12, rng))
    # lung fields remove tissue; diaphragm domes bound them below
    lungs = np.zeros((n, n))
    for side in (-1, 1):
        cx = side * rng.uniform(0.33, 0.4)
        dome = 0.45 + rng.uniform(-0.05, 0.05) - 0.25 * ((cv.x - cx) / 0.35) ** 2
        lung = cv.ellipse(-0.1, cx, 0.68, 0.28, side * 0.08, warp=0.05) & (cv.y < dome)
        dl = ndimage.distance_transform_edt(lung) / n
        lungs += np.clip(dl * 9, 0, 0.75) * (1 + 0.05 * _field((n, n), n / 16, rng))
    proj -= mu_soft * lungs
    # heart (left of patient = image right), mediastinum, spine
    heart = cv.ellipse(0.3, 0.12, 0.27, 0.3, 0.3, warp=0.05)
    proj += 0.35 * mu_soft * ndimage.gaussian_filter(heart.astype(float), 1.5)
    med = np.abs(cv.x - 0.01 * cv.y) < 0.12
    proj += 0.25 * ndimage.gaussian_filter(med.astype(float), 2.0)
    spine = np.abs(cv.x) < 0.07
    vert = spine & (np.sin((cv.y + rng.uniform(0, 1)) * math.pi * 9) > -0.85)
    proj += (
        0.15
        * mu_bone
        * ndimage.gaussian_filter(vert.astype(float), 0.8)
        * np.sqrt(np.clip(1 - (cv.x / 0.07) ** 2, 0, None))
    )

    def tube(poly_y: np.ndarray, poly_x: np.ndarray, radius: float, strength: float) -> np.ndarray:
        from skimage.draw import line

        m = np.zeros((n, n), dtype=bool)
        iy = np.clip(((poly_y + 1) / 2 * n).astype(int), 0, n - 1)
        ix = np.clip(((poly_x + 1) / 2 * n).astype(int), 0, n - 1)
        for k in range(len(iy) - 1):
            rr, cc = line(iy[k], ix[k], iy[k + 1], ix[k + 1])
            m[rr, cc] = True
        d = ndimage.distance_transform_edt(~m) / (radius * n / 2)
        outer = np.sqrt(np.clip(1 - d**2, 0, None))
        inner = np.sqrt(np.clip(0.6**2 - d**2, 0, None))
        return strength * (outer - 0.7 * inner)  # cortical shell: bright edges

    t = np.linspace(0, 1, 40)
    bones = np.zeros((n, n))
    n_ribs = int(rng.integers(9, 12))
    spacing, bend, reach = 1.15 / n_ribs, rng.uniform(0.06, 0.14), rng.uniform(0.55, 0.68)
    for i in range(n_ribs):  # posterior ribs
        y0 = -0.64 + i * spacing + rng.normal(0, 0.01)
        for side in (-1, 1):
            px = side * (0.07 + reach * t)
            py = y0 - bend * np.sin(math.pi * t * 0.8) + rng.uniform(0.12, 0.2) * t**2
            bones += tube(py, px, 0.02 * rng.uniform(0.85, 1.15), 0.2)
    for side in (-1, 1):  # clavicles
        px = side * (0.05 + 0.5 * t)
        py = -0.68 - 0.06 * t + 0.05 * np.sin(math.pi * t)
        bones += tube(py, px, 0.03, 0.3)
    proj += mu_bone * bones * (body_t > 0)
    # pulmonary vessels fanning out from the hila
    lung_mask = lungs > 0.02
    ves = cv.tree(lung_mask, [(-0.05, -0.12), (-0.05, 0.15)], 16, max(1.0, n / 100))
    proj += 0.12 * ndimage.gaussian_filter(ves, 0.8)
    proj = ndimage.gaussian_filter(proj, 0.7)  # detector blur
    lo, hi = rng.uniform(80, 200), rng.uniform(3400, 3900)
    img = lo + (hi - lo) * proj / max(float(proj.max()), 1e-6)
    # collimator: rectangular exposed field, unexposed edges bright
    c = rng.uniform(0.0, 0.04, size=4)
    coll = (cv.x < -1 + c[0]) | (cv.x > 1 - c[1]) | (cv.y < -1 + c[2]) | (cv.y > 1 - c[3])
    img[coll] = hi * 0.98
    return img.astype(np.float32)
