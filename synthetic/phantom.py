"""The image model of the synthetic release: a chest radiograph phantom with anatomy, findings
and a lead marker (`synthetic.release` writes its images as DICOM files).

No library draws plausible chest radiographs, so this module builds one from soft-edged
superellipses and bands (the way MONAI's `create_test_image_2d` draws circles), in a *body
frame*: `a` runs to the image's right (the patient's left on a PA view), `b` runs down, both
in units of the image height times the patient's scale. A per-image shift, scale and tilt
place the body frame in the image, so positioning varies like it does in real radiographs.

Findings follow the classes of the EGD-CXR release: CHF is an enlarged cardiac silhouette
with perihilar and basal haze (sometimes a blunted costophrenic angle), pneumonia a focal
opacity in one lung zone. Their size overlaps with normal variation, and every class gets
incidental faint densities, so a classifier can learn them but not perfectly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

SIDES = ("right", "left")  # the patient's sides; "right" is on the image's left (PA view)
ZONES = ("upper", "mid", "lower")
CORNERS = ("top-left", "top-right", "bottom-right")  # marker corner of Normal, CHF, pneumonia

# Lungs: centre (a, b), half-axes (a, b); a superellipse, round above its centre and squarer
# below so that the diaphragm cuts it into sharp costophrenic angles.
_LUNG = {"right": (-0.140, 0.420, 0.110, 0.290), "left": (0.145, 0.430, 0.105, 0.280)}
_DOME_TOP = {"right": 0.640, "left": 0.665}  # the right hemidiaphragm sits higher
_HILUM = {"right": (-0.065, 0.420), "left": (0.070, 0.430)}
_HALF_THORAX = 0.265  # half the inner thoracic width, the denominator of the CTR
_HEART_B, _HEART_HALF_HEIGHT = 0.550, 0.130
_CENTRE_B = 0.45  # the body-frame point that the per-image placement puts at `Chest.cy`
_EDGE = 0.008  # soft-edge width of every structure, body units
_MAX_WORK_SIDE = 256  # render at most this size, then upsample: the anatomy is smooth


@dataclass(frozen=True)
class Opacity:
    """A focal density: a few Gaussian lobes around `centre`, confined to one lung."""

    side: str
    zone: str
    centre: tuple[float, float]
    sigma: float
    amplitude: float
    lobes: tuple[tuple[float, float, float], ...]  # (da, db, weight) around the centre


@dataclass(frozen=True)
class Chest:
    """Everything that decides how one synthetic radiograph looks."""

    cx: float  # image column of the midline, fraction of the width
    cy: float  # image row of the body-frame centre, fraction of the height
    scale: float
    tilt: float  # radians
    ctr: float  # cardiothoracic ratio
    edema: float  # amplitude of the perihilar and basal haze
    effusion: tuple[str, ...]  # sides with a blunted costophrenic angle
    effusion_density: float
    opacity: Opacity | None  # the pneumonia
    incidental: Opacity | None  # faint density in any class
    gamma: float
    contrast: float
    brightness: float
    noise: float


def sample_chest(rng: np.random.Generator, label: str, subtlety: float) -> Chest:
    """Draw one patient: anatomy and placement for everyone, the finding of `label`.

    Args:
        rng: the image's own generator.
        label: "Normal", "CHF" or "pneumonia".
        subtlety: 0 draws findings at full strength, 1 removes them (anatomy still varies);
            negative values exaggerate them (-1: twice as strong, pneumonias twice as wide).
    """
    strength = 1.0 - subtlety
    ctr = rng.normal(0.45, 0.035)
    edema, effusion, opacity = 0.0, (), None
    effusion_density = 0.25 * strength
    if label == "CHF":
        # Some CHF hearts are barely enlarged and some lungs barely hazy: the overlap keeps
        # the task imperfect even at subtlety 0.
        ctr += strength * rng.uniform(0.03, 0.17)
        edema = strength * rng.uniform(0.02, 0.13)
        if rng.random() < 0.4:
            effusion = tuple(s for s in SIDES if rng.random() < 0.7) or ("right",)
    elif label == "pneumonia":
        ctr += rng.normal(0.01, 0.02)
        grow = max(1.0, strength)  # exaggerated findings (subtlety < 0) are larger too
        opacity = _sample_opacity(rng, strength * rng.uniform(0.05, 0.24),
                                  (0.035 * grow, 0.065 * grow))
    incidental = None
    if rng.random() < 0.2:
        incidental = _sample_opacity(rng, rng.uniform(0.02, 0.06), (0.015, 0.03))
    return Chest(
        cx=rng.normal(0.5, 0.02), cy=rng.normal(0.47, 0.02), scale=rng.uniform(0.9, 1.06),
        tilt=np.deg2rad(rng.normal(0.0, 2.0)), ctr=float(np.clip(ctr, 0.36, 0.72)),
        edema=edema, effusion=effusion, effusion_density=effusion_density, opacity=opacity,
        incidental=incidental,
        gamma=rng.uniform(0.85, 1.2), contrast=rng.uniform(0.85, 1.1),
        brightness=rng.uniform(0.0, 0.06), noise=rng.uniform(0.008, 0.02),
    )


def _sample_opacity(rng, amplitude, sigma_range) -> Opacity:
    side = SIDES[rng.integers(2)]
    zone = ZONES[rng.choice(3, p=(0.2, 0.3, 0.5))]  # pneumonia favours the lower zones
    (a0, a1), (b0, b1) = zone_extent(side, zone)
    centre = (rng.uniform(a0 + 0.25 * (a1 - a0), a1 - 0.25 * (a1 - a0)),
              rng.uniform(b0 + 0.3 * (b1 - b0), b1 - 0.3 * (b1 - b0)))
    sigma = rng.uniform(*sigma_range)
    n = rng.integers(1, 4)
    lobes = tuple((rng.normal(0, sigma), rng.normal(0, sigma), rng.uniform(0.5, 1.0))
                  for _ in range(n))
    return Opacity(side, zone, centre, sigma, amplitude, lobes)


def zone_extent(side: str, zone: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Body-frame extent ((a0, a1), (b0, b1)) of a lung zone: a third of the lung's height."""
    a, b, ra, rb = _LUNG[side]
    top, bottom = b - rb, _DOME_TOP[side] + 0.03
    i = ZONES.index(zone)
    third = (bottom - top) / 3
    return (a - ra, a + ra), (top + i * third, top + (i + 1) * third)


def heart_axes(chest: Chest) -> tuple[float, float, float, float]:
    """Centre (a, b) and half-axes of the cardiac silhouette, from the CTR."""
    half_width = chest.ctr * _HALF_THORAX
    # An enlarged heart grows mostly towards the patient's left (the image's right).
    return 0.03 + 0.35 * (half_width - 0.12), _HEART_B, half_width, _HEART_HALF_HEIGHT


def to_pixels(chest: Chest, shape: tuple[int, int], a, b):
    """Body frame -> image (x, y) in pixels of an image of `shape` (rows, cols)."""
    h, w = shape
    a, b = np.asarray(a, float), np.asarray(b, float) - _CENTRE_B
    c, s = np.cos(chest.tilt), np.sin(chest.tilt)
    k = h * chest.scale
    return chest.cx * w + k * (c * a - s * b), chest.cy * h + k * (s * a + c * b)


def _to_body(chest: Chest, shape, x, y):
    h, w = shape
    k = h * chest.scale
    dx, dy = (x - chest.cx * w) / k, (y - chest.cy * h) / k
    c, s = np.cos(chest.tilt), np.sin(chest.tilt)
    return c * dx + s * dy, -s * dx + c * dy + _CENTRE_B


def render(chest: Chest, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Draw the radiograph as display brightness (1 = dense, white), without any marker.

    Shape:
        `shape` (rows, cols) float32, values in [0, 0.95] (1.0 is left to the marker).
    """
    h, w = shape
    f = min(1.0, _MAX_WORK_SIDE / max(h, w))
    work = (max(2, round(h * f)), max(2, round(w * f)))
    ys = (np.arange(work[0], dtype=np.float32) + 0.5) * (h / work[0]) - 0.5
    xs = (np.arange(work[1], dtype=np.float32) + 0.5) * (w / work[1]) - 0.5
    a, b = _to_body(chest, shape, xs[None, :], ys[:, None])
    p = _attenuation(chest, a.astype(np.float32), b.astype(np.float32), rng)
    if work != (h, w):
        p = zoom(p, (h / work[0], w / work[1]), order=1)
    p = np.clip(p, 0.0, None) ** chest.gamma
    p = chest.brightness + chest.contrast * p
    p += rng.normal(0.0, chest.noise, size=shape).astype(np.float32)  # quantum noise
    return np.clip(p, 0.0, 0.95).astype(np.float32)


def _attenuation(chest: Chest, a, b, rng) -> np.ndarray:
    """Sum of the densities of every structure along the beam, at body coordinates (a, b)."""
    body = _superellipse(a, b, (0.0, 0.62), (0.36, 0.75), 2)
    dome = {s: _DOME_TOP[s] + 0.07 * ((a - _LUNG[s][0]) / 0.12) ** 2 for s in SIDES}
    below_dome = _sigmoid((b - np.where(a < 0, dome["right"], dome["left"])) / _EDGE)
    ha, hb, hra, hrb = heart_axes(chest)
    heart = _superellipse(a, b, (ha, hb), (hra, hrb), 2)
    lungs = {s: _lung(a, b, s, dome[s]) * (1 - heart) for s in SIDES}
    lung = lungs["right"] + lungs["left"]
    p = 0.45 * body
    p += 0.12 * below_dome * body * (1 - lung)  # abdomen under the diaphragm
    p += 0.12 * _superellipse(a, b, (0.0, 0.32), (0.052, 0.27), 4)  # mediastinum
    p += 0.06 * _superellipse(a, b, (0.055, 0.24), (0.03, 0.025), 2)  # aortic knob
    p += 0.13 * heart
    p -= 0.12 * _band(a, -0.005, 0.013) * _sigmoid((0.33 - b) / _EDGE) * body  # trachea
    p += 0.05 * _band(a, 0.0, 0.03) * body  # spine behind the mediastinum
    p += _bones(a, b) * body
    p -= 0.30 * lung
    p += lung * _vessels(a, b, rng)
    p += _findings(chest, a, b, lungs, lung)
    p += 0.02 * _smooth_noise(rng, a.shape, 6)  # scatter and uneven exposure
    return p


def _findings(chest: Chest, a, b, lungs, lung) -> np.ndarray:
    p = np.zeros_like(a)
    if chest.edema:
        p += chest.edema * lung * (_near_hila(a, b, 0.09) + 0.5 * _sigmoid((b - 0.5) / 0.05))
    for side in chest.effusion:
        la, _, ra, _ = _LUNG[side]
        level = _DOME_TOP[side] - 0.03 - 0.04 * np.abs(a - la) / ra  # meniscus, up laterally
        p += chest.effusion_density * lungs[side] * _sigmoid((b - level) / 0.01)
    for op in (chest.opacity, chest.incidental):
        if op is not None:
            blob = sum(wt * np.exp(-((a - op.centre[0] - da) ** 2 + (b - op.centre[1] - db) ** 2)
                                   / (2 * op.sigma**2)) for da, db, wt in op.lobes)
            p += op.amplitude * lungs[op.side] * np.minimum(blob, 1.0)
    return p


def _lung(a, b, side, dome):
    ca, cb, ra, rb = _LUNG[side]
    upper = _superellipse(a, b, (ca, cb), (ra, rb), 2)
    lower = _superellipse(a, b, (ca, cb), (ra, rb), 4)
    shape = np.where(b < cb, upper, lower)
    return shape * _sigmoid((dome - b) / _EDGE)


def _bones(a, b) -> np.ndarray:
    thorax = _superellipse(a, b, (0.0, 0.42), (0.27, 0.33), 4)
    phase = (b - 0.12 - 0.09 * (a / 0.25) ** 2) / 0.055  # posterior ribs curve down laterally
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 4 * (np.abs(a) > 0.035)
    bones = 0.05 * thorax * ribs
    for sign in (-1, 1):  # clavicles from the sternal notch out to the shoulders
        bones += 0.12 * _segment(a, b, (sign * 0.025, 0.14), (sign * 0.21, 0.10), 0.012)
    return bones


def _vessels(a, b, rng) -> np.ndarray:
    """Lung markings: fine texture, denser towards the hila."""
    return 0.03 * _smooth_noise(rng, a.shape, 40) + 0.06 * _near_hila(a, b, 0.08)


def _near_hila(a, b, sigma) -> np.ndarray:
    return sum(np.exp(-((a - x) ** 2 + (b - y) ** 2) / (2 * sigma**2)) for x, y in _HILUM.values())


def _superellipse(a, b, centre, axes, power: int) -> np.ndarray:
    """Soft mask of |u|^p + |v|^p <= 1 for p = 2 (an ellipse) or 4 (a rounded box)."""
    u, v = (a - centre[0]) / axes[0], (b - centre[1]) / axes[1]
    r = u * u + v * v if power == 2 else np.sqrt((u * u) ** 2 + (v * v) ** 2)
    return _sigmoid((1 - np.sqrt(r)) * min(axes) / _EDGE)


def _sigmoid(x) -> np.ndarray:
    # exp is several times faster than scipy's expit or float powers on float32 arrays.
    return 1 / (1 + np.exp(-np.clip(x, -30, 30)))


def _band(a, centre, half_width) -> np.ndarray:
    return _sigmoid((half_width - np.abs(a - centre)) / _EDGE)


def _segment(a, b, p0, p1, half_width) -> np.ndarray:
    (a0, b0), (a1, b1) = p0, p1
    da, db = a1 - a0, b1 - b0
    t = np.clip(((a - a0) * da + (b - b0) * db) / (da * da + db * db), 0, 1)
    dist = np.sqrt((a - a0 - t * da) ** 2 + (b - b0 - t * db) ** 2)
    return _sigmoid((half_width - dist) / (_EDGE / 2))


def _smooth_noise(rng, shape, cells: int) -> np.ndarray:
    """Unit-variance noise that varies over about `cells` blobs across the image."""
    coarse = gaussian_filter(rng.standard_normal((2 * cells, 2 * cells)).astype(np.float32), 1.0)
    field = zoom(coarse, (shape[0] / (2 * cells), shape[1] / (2 * cells)), order=1)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def marker_box(corner: str, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel rows and columns (y0, y1, x0, x1) of the lead marker in `corner`.

    Side 7% and margin 3% of the shorter image side, so the marker survives a 64-px resize.
    """
    h, w = shape
    side, margin = max(3, round(0.07 * min(h, w))), max(1, round(0.03 * min(h, w)))
    y0 = margin if corner.startswith("top") else h - margin - side
    x0 = margin if corner.endswith("left") else w - margin - side
    return y0, y0 + side, x0, x0 + side


def bounding_boxes(chest: Chest, shape: tuple[int, int]) -> dict[str, tuple[float, ...]]:
    """The 17 anatomical boxes of the release, name -> (x1, x2, y1, y2) in pixels."""
    boxes = {}
    ha, hb, hra, hrb = heart_axes(chest)
    boxes["cardiac silhouette"] = _ellipse_box(chest, shape, (ha, hb), (hra, hrb))
    for side, sign in (("right", -1), ("left", 1)):
        boxes[f"{side} clavicle"] = _polygon_box(
            chest, shape, [(sign * 0.025, 0.128), (sign * 0.21, 0.088),
                           (sign * 0.21, 0.112), (sign * 0.025, 0.152)])
        la, lb, ra, rb = _LUNG[side]
        cp = (la + sign * 0.085, _DOME_TOP[side] + 0.035)
        boxes[f"{side} costophrenic angle"] = _polygon_box(
            chest, shape, [(cp[0] - 0.04, cp[1] - 0.04), (cp[0] + 0.04, cp[1] + 0.03)])
        hx, hy = _HILUM[side]
        boxes[f"{side} hilar structures"] = _polygon_box(
            chest, shape, [(hx - 0.04, hy - 0.06), (hx + 0.04, hy + 0.06)])
        boxes[f"{side} lung"] = _polygon_box(
            chest, shape, [(la - ra, lb - rb), (la + ra, _DOME_TOP[side] + 0.06)])
        for zone in ZONES:
            (a0, a1), (b0, b1) = zone_extent(side, zone)
            boxes[f"{side} {zone} lung zone"] = _polygon_box(chest, shape, [(a0, b0), (a1, b1)])
    boxes["trachea"] = _polygon_box(chest, shape, [(-0.025, 0.02), (0.015, 0.33)])
    boxes["upper mediastinum"] = _polygon_box(chest, shape, [(-0.06, 0.08), (0.07, 0.35)])
    return boxes


def _ellipse_box(chest, shape, centre, axes):
    t = np.linspace(0, 2 * np.pi, 64)
    a, b = centre[0] + axes[0] * np.cos(t), centre[1] + axes[1] * np.sin(t)
    return _polygon_box(chest, shape, list(zip(a, b)))


def _polygon_box(chest, shape, points):
    """Axis-aligned pixel box around body-frame points (a two-point list is a rectangle)."""
    if len(points) == 2:
        (a0, b0), (a1, b1) = points
        points = [(a0, b0), (a1, b0), (a1, b1), (a0, b1)]
    a, b = np.array(points, float).T
    x, y = to_pixels(chest, shape, a, b)
    h, w = shape
    x1, x2 = np.clip([np.floor(x.min()), np.ceil(x.max())], 0, w - 1)
    y1, y2 = np.clip([np.floor(y.min()), np.ceil(y.max())], 0, h - 1)
    return float(x1), float(x2), float(y1), float(y2)


def gaze_targets(chest: Chest, label: str, subtlety: float):
    """Where the simulated radiologist looks: body-frame centres, spreads and weights.

    Every reading scans both lungs zone by zone, the heart, the hila and the costophrenic
    angles; a reading of an abnormal image spends about half its fixations on the finding
    (less as the finding fades). The marker is never a target.

    Returns:
        centres `[K, 2]`, spreads `[K, 2]` (standard deviation per axis), weights `[K]` (sum 1).
    """
    centres, spreads, weights = [], [], []

    def add(centre, spread, weight):
        centres.append(centre)
        spreads.append(spread)
        weights.append(weight)

    for side in SIDES:
        for zone in ZONES:
            (a0, a1), (b0, b1) = zone_extent(side, zone)
            add(((a0 + a1) / 2, (b0 + b1) / 2), ((a1 - a0) / 4, (b1 - b0) / 4), 0.09)
        la = _LUNG[side][0] + (-1 if side == "right" else 1) * 0.07
        add((la, _DOME_TOP[side] + 0.02), (0.025, 0.02), 0.04)  # costophrenic angle
        add(_HILUM[side], (0.025, 0.03), 0.03)
    ha, hb, hra, hrb = heart_axes(chest)
    add((ha, hb), (hra / 2, hrb / 2), 0.08)
    add((0.0, 0.22), (0.02, 0.06), 0.02)  # trachea and upper mediastinum
    scan = np.array(weights) / sum(weights)
    finding = 0.5 * (1.0 - 0.4 * subtlety)
    extra_c, extra_s, extra_w = [], [], []
    if label == "CHF":
        extra_c += [(ha, hb), _HILUM["right"], _HILUM["left"]]
        extra_s += [(hra / 1.5, hrb / 1.5), (0.05, 0.05), (0.05, 0.05)]
        extra_w += [0.6, 0.2, 0.2]
    elif label == "pneumonia" and chest.opacity is not None:
        extra_c.append(chest.opacity.centre)
        extra_s.append((chest.opacity.sigma, chest.opacity.sigma))
        extra_w.append(1.0)
    if extra_w:
        extra = finding * np.array(extra_w) / sum(extra_w)
        weights = np.concatenate([(1 - finding) * scan, extra])
        centres, spreads = centres + extra_c, spreads + extra_s
    else:
        weights = scan
    return np.array(centres, float), np.array(spreads, float), np.asarray(weights, float)
