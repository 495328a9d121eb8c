"""Bootstrap AUC equals scikit-learn on the same resamples; CC, KL and NSS on hand-made maps."""

import numpy as np
import pytest
from scipy.stats import entropy, pearsonr
from sklearn.metrics import roc_auc_score

from trainable.metrics import (
    bootstrap_auc,
    kl_divergence,
    map_agreement,
    multiplicity,
    nss,
    paired_bootstrap_diff,
    pearson_cc,
    resample_indices,
    weighted_auc,
)

NAMES = ("Normal", "CHF", "pneumonia")
COUNTS = (30, 42, 36)  # class counts of the dataset authors' 108-image test split


def labels(counts=COUNTS) -> np.ndarray:
    return np.eye(len(counts))[np.repeat(np.arange(len(counts)), counts)]


def scores(y: np.ndarray, signal: float = 0.6, seed: int = 0, decimals: int | None = 2):
    """Scores that rank the true class higher on average; rounding makes ties on purpose."""
    s = signal * y + np.random.default_rng(seed).random(y.shape)
    return s if decimals is None else np.round(s, decimals)


def sklearn_loop(y, s, indices) -> np.ndarray:
    return np.array(
        [[roc_auc_score(y[i, c], s[i, c]) for c in range(y.shape[1])] for i in indices]
    )


@pytest.mark.parametrize("protocol", ["stratified", "paper"])
def test_weighted_auc_equals_sklearn_on_the_same_resamples(protocol):
    y, s = labels(), scores(labels())
    assert len(np.unique(s[:, 0])) < len(s)  # ties present
    indices = resample_indices(y, n_boot=200, seed=3, protocol=protocol)
    expected = sklearn_loop(y, s, indices)
    got = weighted_auc(y, s, multiplicity(indices, len(y)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_point_estimate_and_interval_from_the_same_resamples_as_sklearn():
    y, s = labels(), scores(labels(), decimals=1)  # heavy ties
    result = bootstrap_auc(y, s, NAMES, n_boot=300, seed=5)
    for c, name in enumerate(NAMES):
        assert result[name][0] == pytest.approx(roc_auc_score(y[:, c], s[:, c]), abs=1e-12)
    boot = sklearn_loop(y, s, resample_indices(y, n_boot=300, seed=5))
    boot = np.column_stack([boot, boot.mean(1)])
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    for k, name in enumerate([*NAMES, "mean"]):
        assert result[name][1:] == pytest.approx((lo[k], hi[k]), abs=1e-12)
    assert result["mean"][0] == pytest.approx(np.mean([result[n][0] for n in NAMES]), abs=1e-15)


def test_ties_count_one_half():
    y = np.array([[1], [0], [1], [0]])
    s = np.array([[0.5], [0.5], [0.9], [0.1]])
    # pairs (pos, neg): (0.5, 0.5) tie -> 1/2, (0.5, 0.1) 1, (0.9, 0.5) 1, (0.9, 0.1) 1
    assert weighted_auc(y, s, np.ones((1, 4)))[0, 0] == 3.5 / 4


def test_interval_contains_point_estimate_and_is_ordered():
    y = labels()
    result = bootstrap_auc(y, scores(y), NAMES)
    for auc, lo, hi in result.values():
        assert 0 <= lo <= auc <= hi <= 1
        assert hi - lo > 0.02


def test_stratified_resamples_keep_class_counts():
    y = labels()
    indices = resample_indices(y, n_boot=50, seed=1)
    assert indices.shape == (50, len(y))
    np.testing.assert_array_equal(y[indices].sum(axis=1), np.tile(COUNTS, (50, 1)))
    assert len({tuple(row) for row in np.sort(indices, axis=1)}) == 50  # really resampled


def test_deterministic_per_seed():
    y = labels()
    s = scores(y)
    assert bootstrap_auc(y, s, NAMES, seed=7) == bootstrap_auc(y, s, NAMES, seed=7)
    assert bootstrap_auc(y, s, NAMES, seed=7) != bootstrap_auc(y, s, NAMES, seed=8)


def test_paired_difference_of_a_score_with_itself_is_exactly_zero():
    y = labels()
    s = scores(y)
    assert all(v == (0.0, 0.0, 0.0) for v in paired_bootstrap_diff(y, s, s, NAMES).values())


def test_paired_difference_detects_a_better_score_and_matches_separate_aucs():
    y = labels()
    good, weak = scores(y, signal=1.0, seed=1), scores(y, signal=0.3, seed=2)
    diff = paired_bootstrap_diff(y, good, weak, NAMES, seed=4)
    a, b = bootstrap_auc(y, good, NAMES), bootstrap_auc(y, weak, NAMES)
    assert diff["mean"][0] == pytest.approx(a["mean"][0] - b["mean"][0], abs=1e-12)
    assert diff["mean"][1] > 0  # the interval excludes 0
    # shared resamples make the difference's interval narrower than the sum of half-widths
    half = lambda r: (r["mean"][2] - r["mean"][1]) / 2
    assert (diff["mean"][2] - diff["mean"][1]) / 2 < half(a) + half(b)


def test_paper_protocol_is_wider_than_stratified_at_108_images():
    y = labels()
    s = scores(y)
    width = lambda r: r["mean"][2] - r["mean"][1]
    paper = [width(bootstrap_auc(y, s, NAMES, seed=k, protocol="paper")) for k in range(5)]
    stratified = width(bootstrap_auc(y, s, NAMES, protocol="stratified"))
    assert np.mean(paper) > 1.2 * stratified
    assert resample_indices(y, protocol="paper").shape == (30, 59)


def test_paper_protocol_reports_the_bootstrap_median_as_the_auc():
    # 20 images, 2 classes; the expected numbers from scikit-learn on the same resamples
    y = labels((12, 8))
    s = scores(y, signal=0.4, seed=7)
    indices = resample_indices(y, n_boot=30, seed=2, protocol="paper")
    assert indices.shape == (30, 11)  # round(0.55 * 20) images each
    usable = [i for i in indices if 0 < y[i, 0].sum() < len(i)]  # both labels present
    boot = sklearn_loop(y, s, usable)
    result = bootstrap_auc(y, s, ("a", "b"), n_boot=30, seed=2, protocol="paper")
    for c, name in enumerate(("a", "b")):
        assert result[name][0] == pytest.approx(np.median(boot[:, c]), abs=1e-12)
    assert result["mean"][0] == pytest.approx(np.median(boot.mean(1)), abs=1e-12)
    full = roc_auc_score(y[:, 0], s[:, 0])
    assert result["a"][0] != pytest.approx(full, abs=1e-6)  # not the full-data AUC any more
    # the stratified protocol keeps the full-data AUC as its point estimate
    assert bootstrap_auc(y, s, ("a", "b"), n_boot=30)["a"][0] == pytest.approx(full, abs=1e-12)


def test_paper_protocol_paired_difference_is_the_median_difference():
    y = labels((12, 8))
    a, b = scores(y, signal=0.8, seed=1), scores(y, signal=0.2, seed=2)
    indices = resample_indices(y, n_boot=30, seed=0, protocol="paper")
    usable = [i for i in indices if 0 < y[i, 0].sum() < len(i)]
    diff = sklearn_loop(y, a, usable)[:, 0] - sklearn_loop(y, b, usable)[:, 0]
    result = paired_bootstrap_diff(y, a, b, ("a", "b"), n_boot=30, protocol="paper")
    assert result["a"][0] == pytest.approx(np.median(diff), abs=1e-12)


def test_paper_protocol_skips_resamples_without_both_classes():
    # 2 positives of 20: a 11-image resample often has none; those must not become NaN or 0.5
    y = labels((18, 2))
    s = scores(y, signal=2.0, decimals=None)  # perfectly separated
    indices = resample_indices(y, n_boot=200, protocol="paper")
    assert (y[indices, 1].sum(1) == 0).any()
    result = bootstrap_auc(y, s, ("a", "b"), n_boot=200, protocol="paper")
    assert result["b"] == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda y: y.astype(float), 1.0),  # perfect
        (lambda y: 1.0 - y, 0.0),  # inverted
        (lambda y: np.full(y.shape, 0.3), 0.5),  # constant
    ],
)
def test_edge_classifiers(make, expected):
    y = labels()
    result = bootstrap_auc(y, make(y), NAMES, n_boot=100)
    for auc, lo, hi in result.values():
        assert auc == lo == hi == expected


def test_class_without_positives_is_nan_not_an_error():
    y = labels((5, 5, 0))
    result = bootstrap_auc(y, scores(y), NAMES, n_boot=50)
    assert np.isnan(result["pneumonia"]).all() and np.isnan(result["mean"]).all()
    assert np.isfinite(result["Normal"]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_names": ("a", "b")}, "class_names"),
        ({"y_score": np.zeros((4, 3))}, "y_score"),
        ({"protocol": "bca"}, "protocol"),
        ({"y_true": np.full((108, 3), 0.5)}, "y_true"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    y = labels()
    args = {"y_true": y, "y_score": scores(y), "class_names": NAMES} | kwargs
    with pytest.raises(ValueError, match=match):
        bootstrap_auc(**args)


# --- map agreement --------------------------------------------------------------------------


def blob(center, size=32, sigma=3.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-((yy - center[0]) ** 2 + (xx - center[1]) ** 2) / (2 * sigma**2))


def test_identical_maps_have_cc_one_and_kl_zero():
    maps = np.stack([blob((8, 8)), blob((20, 25)) + 0.1])
    np.testing.assert_allclose(pearson_cc(maps, maps), 1.0, atol=1e-12)
    np.testing.assert_allclose(kl_divergence(maps, maps), 0.0, atol=1e-12)
    # scale invariance: both measures compare shapes, not magnitudes
    np.testing.assert_allclose(pearson_cc(7 * maps, maps), 1.0, atol=1e-12)
    np.testing.assert_allclose(kl_divergence(maps, 7 * maps), 0.0, atol=1e-12)


def test_cc_equals_scipy_pearsonr():
    rng = np.random.default_rng(0)
    pred, gaze = rng.random((4, 16, 16)), rng.random((4, 16, 16))
    gaze[1] += pred[1]  # one correlated pair
    expected = [pearsonr(p.ravel(), g.ravel()).statistic for p, g in zip(pred, gaze)]
    np.testing.assert_allclose(pearson_cc(pred, gaze), expected, atol=1e-12)


def test_kl_matches_scipy_entropy_on_positive_maps_and_orders_maps():
    rng = np.random.default_rng(1)
    gaze, pred = rng.random((3, 8, 8)) + 0.1, rng.random((3, 8, 8)) + 0.1
    expected = [entropy(g.ravel(), p.ravel()) for g, p in zip(gaze, pred)]
    np.testing.assert_allclose(kl_divergence(gaze, pred), expected, rtol=1e-9)
    gaze = blob((8, 8))[None]
    assert kl_divergence(gaze, blob((10, 10))[None]) < kl_divergence(gaze, blob((24, 24))[None])


def test_nss_high_where_fixations_hit_peaks():
    pred = blob((8, 8))[None]
    on_peak = np.zeros((1, 32, 32))
    on_peak[0, 8, 8] = 3
    off_peak = np.zeros((1, 32, 32))
    off_peak[0, 25, 25] = 3
    assert nss(pred, on_peak)[0] > 3  # several standard deviations above the mean
    assert nss(pred, off_peak)[0] < 0
    z = (pred - pred.mean()) / pred.std()
    mixed = on_peak.copy()
    mixed[0, 25, 25] = 1  # weighted by counts: (3 z_peak + 1 z_off) / 4
    assert nss(pred, mixed)[0] == pytest.approx((3 * z[0, 8, 8] + z[0, 25, 25]) / 4, rel=1e-12)


def test_constant_map_scores_chance_and_empty_fixations_are_skipped():
    flat = np.ones((2, 16, 16))
    gaze = np.stack([blob((4, 4), 16), blob((10, 10), 16)])
    fix = np.zeros((2, 16, 16))
    fix[0, 4, 4] = 1  # image 1 has no fixations
    assert (pearson_cc(flat, gaze) == 0).all()
    assert nss(flat, fix)[0] == 0 and np.isnan(nss(flat, fix)[1])
    result = map_agreement(gaze, gaze, fix)
    assert result["cc"] == pytest.approx(1.0) and result["kl"] == pytest.approx(0.0, abs=1e-12)
    assert result["nss"] == pytest.approx(nss(gaze, fix)[0])  # mean over the defined image only


def test_map_agreement_refuses_signed_maps_and_shape_mismatch():
    gaze = blob((8, 8))[None]
    with pytest.raises(ValueError, match="pred"):
        map_agreement(gaze - 0.5, gaze, gaze)
    with pytest.raises(ValueError, match="shapes"):
        map_agreement(gaze, gaze[:, :16], gaze)
