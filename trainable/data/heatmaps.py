"""Static and temporal eye-gaze heatmaps from fixation points.

The reference (the dataset authors' `create_heatmap_images_and_or_videos.py`) counts the
fixations on the DICOM grid padded to even height and width, blurs the counts with
`scipy.ndimage.gaussian_filter(sigma=150)` (mode 'reflect', truncate 4.0) and min-max scales
the result; training then resizes it to 224 px. Blurring a 3000x2500 grid with a 1,201-tap
kernel takes seconds per image, only to be thrown away by the resize. The blur is separable
and the counts are a few dozen points, so here the blurred map is evaluated directly at the
output pixel centres: a [h, n] by [n, w] product of 1-D kernel sums, with the reflections of
each point that scipy's 'reflect' boundary adds, and the same truncation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trainable.errors import DataError

SIGMA = 150.0  # original pixels, the reference's value
TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


def static_heatmap(
    points: np.ndarray,
    shape: tuple[int, int],
    sigma: float = SIGMA,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Fixation counts blurred by a Gaussian and min-max scaled, like the reference.

    With `out_size`, the blurred map is evaluated at the output pixel centres and min-max
    scaled there; the reference scales at full resolution and then resizes, which lowers
    narrow peaks. The two agree within 0.001 at sigma 150 for 224 px from 3000x2500 (a blur
    11 output pixels wide) and drift apart, up to about 0.03, as the blur narrows to
    3 output pixels.

    Args:
        points: fixation points (x, y) in original pixels, x the column and y the row; each
            fixation counts once (duration is ignored, as in the reference).
        shape: (H, W) of the original image; every point must lie inside it.
        sigma: standard deviation of the blur, in original pixels.
        out_size: (h, w) of the result, computed at that size directly; None for (H, W).

    Returns:
        float32 map in [0, 1].

    Shape:
        points [n, 2] -> [h, w] (out_size) or [H, W].

    Raises:
        DataError: no points, or a point outside the image.
    """
    rows, cols = _axis_weights(points, shape, sigma, out_size)
    return _min_max(rows @ cols.T)


def temporal_heatmaps(
    points: np.ndarray,
    times: np.ndarray,
    shape: tuple[int, int],
    sigma: float = SIGMA,
    out_size: tuple[int, int] | None = None,
    bins: int | Sequence[float] | None = None,
) -> np.ndarray:
    """One heatmap per fixation (the reference's frames), or one per time bin.

    Each map is min-max scaled on its own, like the reference's frames; a bin without a
    fixation is all zeros.

    Args:
        points: fixation points (x, y) in original pixels, in viewing order.
        times: the time of each fixation in seconds (`Time (in secs)`).
        shape: (H, W) of the original image.
        sigma: standard deviation of the blur, in original pixels.
        out_size: (h, w) of the maps; None for (H, W).
        bins: None for one map per fixation; an int for that many equal bins over
            [0, max(times)]; or a sequence of bin edges in seconds (right edge inclusive).

    Returns:
        float32 maps in [0, 1].

    Shape:
        points [n, 2], times [n] -> [n, h, w] (bins None) or [n_bins, h, w].
    """
    rows, cols = _axis_weights(points, shape, sigma, out_size)
    times = np.asarray(times, dtype=np.float64)
    n_points = rows.shape[1]
    if times.shape != (n_points,):
        raise DataError(f"temporal_heatmaps: {times.size} times for {n_points} points")
    if bins is None:
        return np.stack([_min_max(np.outer(rows[:, i], cols[:, i])) for i in range(n_points)])
    edges = np.linspace(0.0, times.max(), bins + 1) if np.isscalar(bins) else np.asarray(bins)
    which = np.digitize(times, edges[1:-1], right=True)  # bin i holds (edges[i], edges[i+1]]
    maps = []
    for i in range(len(edges) - 1):
        inside = which == i
        maps.append(_min_max(rows[:, inside] @ cols[:, inside].T))
    return np.stack(maps)


def fixation_map(
    points: np.ndarray, shape: tuple[int, int], out_size: tuple[int, int]
) -> np.ndarray:
    """Fixation counts per output pixel (for NSS), clipped at 255.

    A fixation at original pixel (x, y) falls in the output pixel that covers its centre.

    Shape:
        points [n, 2] -> [h, w] uint8.
    """
    points = _checked(points, shape)
    (height, width), (out_h, out_w) = shape, out_size
    rows = np.minimum(((points[:, 1] + 0.5) * out_h / height).astype(int), out_h - 1)
    cols = np.minimum(((points[:, 0] + 0.5) * out_w / width).astype(int), out_w - 1)
    counts = np.zeros(out_size, dtype=np.int64)
    np.add.at(counts, (rows, cols), 1)
    return np.minimum(counts, 255).astype(np.uint8)


def reference_static_heatmap(
    points: np.ndarray,
    shape: tuple[int, int],
    sigma: float = SIGMA,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The reference algorithm at full resolution (slow; for tests and the benchmark).

    Counts on the grid padded to even size, `gaussian_filter`, min-max, then a bilinear
    (antialiased) resize of the padded map to `out_size`, as the authors' training resized
    their heatmap PNG. Without `out_size`, the map cropped back to `shape`. Arguments as
    for `static_heatmap`.

    Shape:
        points [n, 2] -> [h, w] (out_size) or [H, W].
    """
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    points = _checked(points, shape)
    height, width = shape
    counts = np.zeros((height + height % 2, width + width % 2))
    np.add.at(counts, (points[:, 1].astype(int), points[:, 0].astype(int)), 1.0)
    blurred = _min_max(gaussian_filter(counts, sigma, mode="reflect", truncate=TRUNCATE))
    if out_size is None:
        return blurred[:height, :width]
    resized = Image.fromarray(blurred).resize(out_size[::-1], Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def reference_rendering_lut() -> np.ndarray:
    """The grey level the dataset authors' training target takes for each of 256 heatmap levels.

    Their pipeline saves the min-max scaled heatmap with `matplotlib.pyplot.imsave` (viridis, 8
    bits per channel), reads the PNG back as RGB and converts it to grey with PIL (ITU-R 601
    luma), then divides by 255. Level i holds the heatmap values in [i / 256, (i + 1) / 256)
    (1.0 in level 255), as matplotlib bins them. The same two libraries compute the table here,
    so it is their rounding, not a copy of it. The result runs from 30/255 where no one looked
    to 215/255 at the peak, monotone in between.

    Shape:
        -> [256] float32 in [0, 1].
    """
    import matplotlib
    from PIL import Image

    colours = matplotlib.colormaps["viridis"](np.arange(256), bytes=True)[:, :3]
    grey = Image.fromarray(colours[None].astype(np.uint8), "RGB").convert("L")
    return np.asarray(grey, dtype=np.float32)[0] / 255


def _axis_weights(points, shape, sigma, out_size) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis Gaussian weights of each point at each output row and column.

    Shape:
        points [n, 2] -> rows [h, n], cols [w, n].
    """
    points = _checked(points, shape)
    height, width = shape
    out_h, out_w = out_size if out_size is not None else shape
    rows = _kernel_sums(points[:, 1], height, out_h, sigma)
    cols = _kernel_sums(points[:, 0], width, out_w, sigma)
    return rows, cols


def _kernel_sums(coords: np.ndarray, length: int, out_length: int, sigma: float) -> np.ndarray:
    """The 1-D truncated Gaussian at `out_length` sample points, summed over each coordinate's
    reflections on the axis padded to even length (scipy's 'reflect' extends the axis as
    ... c b a | a b c | c b a ..., so a point p also appears at -1 - p and 2 N - 1 - p, with
    period 2 N).

    Output pixel i samples original position (i + 0.5) * length / out_length - 0.5, its centre,
    aligned with the image resized from (H, W).

    Shape:
        coords [n] -> [out_length, n].
    """
    padded = length + length % 2
    radius = int(TRUNCATE * sigma + 0.5)  # scipy's kernel radius
    samples = (np.arange(out_length) + 0.5) * (length / out_length) - 0.5
    periods = np.arange(-(radius // (2 * padded) + 1), radius // (2 * padded) + 2) * 2 * padded
    images = np.concatenate([coords[None, :] + periods[:, None],
                             -1.0 - coords[None, :] + periods[:, None]])  # [m, n]
    distance = samples[:, None, None] - images[None]  # [out_length, m, n]
    weights = np.exp(-0.5 * (distance / sigma) ** 2) * (np.abs(distance) <= radius)
    return weights.sum(axis=1)


def _checked(points, shape) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points) == 0:
        raise DataError("empty fixation point set: a heatmap needs at least one point")
    height, width = shape
    outside = (points[:, 0] < 0) | (points[:, 0] >= width) | (points[:, 1] < 0)
    outside |= points[:, 1] >= height
    if outside.any():
        raise DataError(
            f"{int(outside.sum())} fixation point(s) outside the {height}x{width} image, "
            f"e.g. (x, y) = {tuple(points[outside][0])}"
        )
    return points


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    if high <= low:  # no point, or a flat map: nothing to scale
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
