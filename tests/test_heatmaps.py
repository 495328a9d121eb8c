"""Gaze heatmaps computed at the output size match the full-resolution reference algorithm."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainable.data import fixation_map, static_heatmap, temporal_heatmaps
from trainable.data.heatmaps import reference_static_heatmap
from trainable.errors import DataError


def clustered_points(shape, n=45, seed=0):
    """Fixations like a reading: clusters over the lungs and heart, a few near the edges."""
    rng = np.random.default_rng(seed)
    height, width = shape
    centres = rng.uniform((0.2 * width, 0.2 * height), (0.8 * width, 0.8 * height), (5, 2))
    points = centres[rng.integers(0, 5, n)] + rng.normal(0, 0.06 * width, (n, 2))
    points[:3] = [(0, 0), (width - 1, height // 3), (width // 2, height - 1)]  # the boundary
    return np.clip(points, 0, (width - 1, height - 1)).astype(int)


def rescaled(values):
    return (values - values.min()) / (values.max() - values.min())


def test_matches_the_reference_at_224_for_a_3000x2500_image():
    # About 10 s: the reference blurs the full grid; the benchmark script times both.
    shape = (3000, 2500)
    points = clustered_points(shape)
    direct = static_heatmap(points, shape, sigma=150.0, out_size=(224, 224))
    reference = reference_static_heatmap(points, shape, sigma=150.0, out_size=(224, 224))
    assert direct.shape == (224, 224) and direct.dtype == np.float32
    assert np.abs(direct - reference).max() < 0.03


@pytest.mark.parametrize("shape, out_size, sigma", [
    ((480, 390), (224, 224), 24.0),  # the real blur in output pixels (11), a smaller image
    ((301, 257), (64, 64), 53.0),  # the same, coarser output
    ((257, 301), (100, 60), 150.0),  # synthetic-sized image, the reference's sigma
])
def test_matches_the_reference_at_other_sizes(shape, out_size, sigma):
    points = clustered_points(shape, n=30, seed=1)
    direct = static_heatmap(points, shape, sigma, out_size)
    assert np.abs(direct - reference_static_heatmap(points, shape, sigma, out_size)).max() < 0.03


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 40), width=st.integers(1, 40), sigma=st.floats(0.5, 200.0),
    data=st.data(),
)
def test_full_resolution_equals_scipy_reflect_boundary(height, width, sigma, data):
    # A kernel far wider than the image reflects many times: the direct sum must follow scipy.
    n = data.draw(st.integers(1, 6))
    xs = data.draw(st.lists(st.integers(0, width - 1), min_size=n, max_size=n))
    ys = data.draw(st.lists(st.integers(0, height - 1), min_size=n, max_size=n))
    points = np.stack([xs, ys], axis=1)
    direct = static_heatmap(points, (height, width), sigma)
    # The reference scales over the grid padded to even size, then crops: rescale the crop.
    reference = reference_static_heatmap(points, (height, width), sigma)
    if np.ptp(reference) < 1e-3:  # nearly flat: min-max only amplifies rounding
        return
    np.testing.assert_allclose(direct, rescaled(reference.astype(np.float64)), atol=1e-4)


def test_x_is_the_column_and_y_the_row():
    heatmap = static_heatmap(np.array([[10, 40]]), (50, 100), sigma=3.0)
    assert heatmap.shape == (50, 100)
    assert np.unravel_index(heatmap.argmax(), heatmap.shape) == (40, 10)
    assert heatmap.max() == 1.0 and heatmap.min() == 0.0


def test_fixations_are_counted_not_merged():
    once = static_heatmap(np.array([[10, 10], [40, 10]]), (20, 50), sigma=4.0)
    twice = static_heatmap(np.array([[10, 10], [10, 10], [40, 10]]), (20, 50), sigma=4.0)
    assert once[10, 40] == pytest.approx(1.0) and twice[10, 40] == pytest.approx(0.5, abs=0.01)


def test_no_point_or_a_point_off_the_image_is_a_data_error():
    with pytest.raises(DataError, match="empty fixation point set"):
        static_heatmap(np.zeros((0, 2)), (10, 10))
    with pytest.raises(DataError, match=r"outside the 10x20 image"):
        static_heatmap(np.array([[5, 5], [20, 3]]), (10, 20))  # x = W is beyond the last column


def test_temporal_maps_per_fixation_and_per_time_bin():
    shape, out = (120, 90), (30, 30)
    points = np.array([[10, 10], [80, 15], [45, 100], [20, 60]])
    times = np.array([0.5, 1.0, 2.5, 4.0])
    frames = temporal_heatmaps(points, times, shape, sigma=8.0, out_size=out)
    assert frames.shape == (4, 30, 30)
    for frame, point in zip(frames, points, strict=True):
        np.testing.assert_allclose(frame, static_heatmap(point[None], shape, 8.0, out), atol=1e-6)
    binned = temporal_heatmaps(points, times, shape, sigma=8.0, out_size=out, bins=[0, 1, 2, 4])
    assert binned.shape == (3, 30, 30)
    np.testing.assert_allclose(binned[0], static_heatmap(points[:2], shape, 8.0, out), atol=1e-6)
    assert not binned[1].any()  # no fixation between 1 s and 2 s
    np.testing.assert_allclose(binned[2], static_heatmap(points[2:], shape, 8.0, out), atol=1e-6)
    assert temporal_heatmaps(points, times, shape, 8.0, out, bins=2).shape == (2, 30, 30)
    with pytest.raises(DataError, match="3 times for 4 points"):
        temporal_heatmaps(points, times[:3], shape)


def test_fixation_map_counts_each_fixation_in_its_output_pixel():
    points = np.array([[0, 0], [99, 49], [99, 49], [50, 25]])
    counts = fixation_map(points, (50, 100), (10, 20))
    assert counts.dtype == np.uint8 and counts.sum() == 4
    assert counts[0, 0] == 1 and counts[9, 19] == 2 and counts[5, 10] == 1
    crowded = fixation_map(np.tile([[3, 3]], (300, 1)), (10, 10), (5, 5))
    assert crowded.max() == 255  # clipped, not wrapped around
