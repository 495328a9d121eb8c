"""Honest validation metrics: bootstrap AUC intervals and agreement of maps with gaze.

AUC: per-class one-vs-rest ROC AUC with a percentile bootstrap interval; the macro mean gets its
own interval (the mean over classes within each resample). Two resampling protocols:

- ``"stratified"`` (default): 2,000 resamples, each drawn with replacement within every label
  pattern, so each resample keeps the class counts of the data. Every class then has positives
  and negatives in every resample. The point estimate is the AUC on the full data.
- ``"paper"``: our reading of Watanabe et al. 2022, whose text reports "30 bootstrap iterations
  of 55-60 samples" and no code: 30 resamples of ``round(0.55 * N)`` images drawn with
  replacement from all images, and, as the paper reports, the median over the resamples as the
  point estimate (for the mean too: the median of the per-resample macro means). Kept for
  comparison with the paper's numbers only: 30 resamples of half the images make a noisier
  estimate than the full-data AUC.

Map agreement (Bylinskii et al. 2019, "What do different evaluation metrics tell us about
saliency models?"): Pearson CC, KL divergence and NSS, per image, averaged over the images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROTOCOLS = ("stratified", "paper")
DEFAULT_N_BOOT = {"stratified": 2000, "paper": 30}
PAPER_FRACTION = 0.55  # resample size of the paper protocol, as a fraction of the images
EPS = np.finfo(np.float64).eps


# --- bootstrap AUC -------------------------------------------------------------------------


def resample_indices(
    y_true: np.ndarray, n_boot: int | None = None, seed: int = 0, protocol: str = "stratified"
) -> np.ndarray:
    """Image indices of each bootstrap resample, drawn with `numpy.random.default_rng(seed)`.

    Args:
        y_true: one-hot (or multi-hot) labels.
        n_boot: number of resamples; None for the protocol's default (2,000 stratified, 30 paper).
        seed: seed of the generator; the same seed gives the same resamples.
        protocol: ``"stratified"`` (each resample keeps the count of every label pattern) or
            ``"paper"`` (``round(0.55 N)`` images drawn from all, see the module docstring).

    Returns:
        int array of indices into the rows of `y_true`.

    Shape:
        y_true [N, C] -> [n_boot, N] (stratified) or [n_boot, round(0.55 N)] (paper).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: {protocol!r} is not one of {PROTOCOLS}")
    n_boot = DEFAULT_N_BOOT[protocol] if n_boot is None else n_boot
    if n_boot < 1:
        raise ValueError(f"n_boot: must be at least 1, got {n_boot}")
    y_true = np.asarray(y_true)
    n = len(y_true)
    rng = np.random.default_rng(seed)
    if protocol == "paper":
        return rng.integers(0, n, size=(n_boot, max(1, round(PAPER_FRACTION * n))))
    _, stratum = np.unique(y_true, axis=0, return_inverse=True)
    stratum = stratum.ravel()
    indices = np.empty((n_boot, n), dtype=np.int64)
    start = 0
    for k in range(stratum.max() + 1):
        members = np.flatnonzero(stratum == k)
        draw = rng.integers(0, len(members), size=(n_boot, len(members)))
        indices[:, start : start + len(members)] = members[draw]
        start += len(members)
    return indices


def multiplicity(indices: np.ndarray, n: int) -> np.ndarray:
    """How many times each image occurs in each resample.

    Shape:
        indices [B, M] -> [B, n] float64 counts (each row sums to M).
    """
    b = len(indices)
    flat = (indices + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def weighted_auc(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC of each class in each weighted copy of the data.

    Row b of `weights` says how many times each image counts, so row b of the result is
    `roc_auc_score` on the data with image i repeated `weights[b, i]` times, and a row of ones
    is the plain AUC. A class without positives or negatives in a row gets NaN.

    Why our own: scikit-learn has neither a batch of sample weights nor a bootstrap, and a loop
    over `roc_auc_score` is hundreds of times slower (benchmarks/bench_metrics.py). The AUC is
    the Mann-Whitney statistic P(score of a positive > score of a negative) with ties counted
    1/2; grouping the images into tie groups (equal scores) turns it into matrix products: the
    positive and negative weight in each group, and for each group the negative weight below it.
    With integer weights every sum is exact in float64, so only the final division rounds.

    Shape:
        y_true [N, C] in {0, 1}, y_score [N, C], weights [B, N] -> [B, C] float64.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    out = np.empty((len(weights), y_true.shape[1]))
    for c in range(y_true.shape[1]):
        _, group = np.unique(y_score[:, c], return_inverse=True)  # ascending tie groups
        member = np.zeros((len(group), group.max() + 1))
        member[np.arange(len(group)), group] = 1.0
        pos = y_true[:, c] == 1
        pos_weight = weights[:, pos] @ member[pos]  # [B, G]
        neg_weight = weights[:, ~pos] @ member[~pos]  # [B, G]
        # negatives strictly below each group, plus half of those tied with it
        below = np.cumsum(neg_weight, axis=1) - 0.5 * neg_weight
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, c] = (pos_weight * below).sum(1) / (pos_weight.sum(1) * neg_weight.sum(1))
    return out


def bootstrap_auc(
    y_true: np.ndarray,
    y_score: np.ndarray,
    class_names: Sequence[str],
    n_boot: int | None = None,
    alpha: float = 0.05,
    seed: int = 0,
    protocol: str = "stratified",
) -> dict[str, tuple[float, float, float]]:
    """Per-class and macro-mean AUC with percentile bootstrap intervals.

    Resamples in which some class (one defined on the full data) has no positives or no
    negatives cannot occur with ``"stratified"``; with ``"paper"`` they are skipped. A class
    without positives or negatives in `y_true` itself has no AUC: its entry is NaNs, and so is
    the mean's.

    Args:
        y_true: one-hot labels.
        y_score: a score per class (probability or logit; only the order matters).
        class_names: one name per column.
        n_boot: number of resamples; None for the protocol's default (2,000 stratified, 30 paper).
        alpha: 1 - the interval's coverage (0.05 gives a 95% interval).
        seed: seed of the resampling.
        protocol: ``"stratified"`` or ``"paper"`` (see the module docstring).

    Returns:
        ``{name: (auc, lo, hi)}`` for each class and ``"mean"``; `auc` is the full-data AUC
        (stratified) or the median over the resamples (paper).

    Shape:
        y_true [N, C], y_score [N, C].
    """
    y_true, y_score = _check_labels_scores(y_true, y_score, class_names)
    boot = weighted_auc(y_true, y_score, _weights(y_true, n_boot, seed, protocol))
    point = weighted_auc(y_true, y_score, np.ones((1, len(y_true))))[0]
    return _intervals(point, _defined_rows(boot, point), class_names, alpha,
                      median=protocol == "paper")


def paired_bootstrap_diff(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    class_names: Sequence[str],
    n_boot: int | None = None,
    alpha: float = 0.05,
    seed: int = 0,
    protocol: str = "stratified",
) -> dict[str, tuple[float, float, float]]:
    """AUC(a) - AUC(b) per class and for the mean, with an interval from shared resamples.

    Two configurations evaluated on the same ~100 test images have AUC intervals of half-width
    0.08-0.09 each, so overlapping intervals say little; the difference on the same resamples
    cancels the variation the two share. An interval that excludes 0 is a difference.

    Args:
        y_true: one-hot labels.
        score_a: scores of configuration a.
        score_b: scores of configuration b, for the same images in the same order.
        class_names, n_boot, alpha, seed, protocol: as in `bootstrap_auc`.

    Returns:
        ``{name: (diff, lo, hi)}`` for each class and ``"mean"``; `diff` on the full data
        (stratified) or the median of the per-resample differences (paper), as `bootstrap_auc`.

    Shape:
        y_true [N, C], score_a [N, C], score_b [N, C].
    """
    y_true, score_a = _check_labels_scores(y_true, score_a, class_names)
    _, score_b = _check_labels_scores(y_true, score_b, class_names)
    weights = _weights(y_true, n_boot, seed, protocol)
    ones = np.ones((1, len(y_true)))
    point = (weighted_auc(y_true, score_a, ones) - weighted_auc(y_true, score_b, ones))[0]
    boot = weighted_auc(y_true, score_a, weights) - weighted_auc(y_true, score_b, weights)
    return _intervals(point, _defined_rows(boot, point), class_names, alpha,
                      median=protocol == "paper")


def seeds_bootstrap_auc(
    y_true: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    n_boot: int | None = None,
    alpha: float = 0.05,
    seed: int = 0,
    reference: np.ndarray | None = None,
) -> dict[str, tuple[float, float, float]]:
    """AUC of a configuration trained with several seeds, with an interval over seeds and images.

    A configuration's AUC varies with the seed it trains with as well as with the test images;
    an interval over images alone (`bootstrap_auc` of one model) leaves the first out. Here each
    resample draws images (stratified, as `resample_indices(y_true, n_boot, seed)`) and, within
    it, as many seeds as there are, with replacement (`numpy.random.default_rng((seed, 1))`:
    `integers(0, K, size=(n_boot, K))`), and averages the drawn seeds' AUCs on the drawn
    images: a two-level (hierarchical) bootstrap. With `reference` (another configuration's
    seeds, scored on the same images), the same for AUC(scores) - AUC(reference): images shared
    (paired), each configuration's seeds drawn on their own (its seeds are its own models:
    the reference's drawn next, `integers(0, K', size=(n_boot, K'))` from the same generator).

    Why our own: no library bootstraps over two levels; `weighted_auc` scores every resample of
    every seed in a few matrix products.

    Args:
        y_true: one-hot labels.
        scores: each seed's scores for the same images.
        class_names, n_boot, alpha, seed: as in `bootstrap_auc` (stratified protocol).
        reference: the other configuration's scores, or None.

    Returns:
        ``{name: (auc, lo, hi)}`` for each class and ``"mean"``: `auc` the mean over seeds of
        each seed's AUC on all images (with `reference`, the difference of those means).

    Shape:
        y_true [N, C], scores [K, N, C], reference [K', N, C].
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 3 or len(scores) == 0:
        raise ValueError(f"scores: expected [K, N, C] with K >= 1, got {scores.shape}")
    for s in scores:
        y_true, _ = _check_labels_scores(y_true, s, class_names)
    weights = _weights(y_true, n_boot, seed, "stratified")
    rng = np.random.default_rng((seed, 1))
    point, boot = _seed_means(y_true, scores, weights, rng)
    if reference is not None:
        reference = np.asarray(reference, dtype=np.float64)
        if reference.ndim != 3 or len(reference) == 0 or reference.shape[1:] != scores.shape[1:]:
            raise ValueError(f"reference: expected [K', N, C] like scores {scores.shape}, got "
                             f"{reference.shape}")
        for s in reference:
            _check_labels_scores(y_true, s, class_names)
        ref_point, ref_boot = _seed_means(y_true, reference, weights, rng)
        point, boot = point - ref_point, boot - ref_boot
    return _intervals(point, _defined_rows(boot, point), class_names, alpha)


def _seed_means(y_true, scores, weights, rng) -> tuple[np.ndarray, np.ndarray]:
    """(mean over seeds of each seed's full-data AUC [C], the resamples' means [B, C])."""
    ones = np.ones((1, len(y_true)))
    point = np.mean([weighted_auc(y_true, s, ones)[0] for s in scores], axis=0)
    per_seed = np.stack([weighted_auc(y_true, s, weights) for s in scores])  # [K, B, C]
    pick = rng.integers(0, len(scores), size=(len(weights), len(scores)))  # [B, K]
    return point, per_seed[pick, np.arange(len(weights))[:, None]].mean(axis=1)


def _weights(y_true, n_boot, seed, protocol) -> np.ndarray:
    return multiplicity(resample_indices(y_true, n_boot, seed, protocol), len(y_true))


def _defined_rows(boot: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Drop resamples where a class that has an AUC on the full data has none (paper protocol)."""
    return boot[np.isfinite(boot[:, np.isfinite(point)]).all(axis=1)]


def _intervals(point, boot, class_names, alpha,
               median: bool = False) -> dict[str, tuple[float, float, float]]:
    """Percentile intervals; the point estimate is `point` or, with `median`, the bootstrap
    median (NaN without a usable resample)."""
    point = np.append(point, point.mean())
    boot = np.column_stack([boot, boot.mean(axis=1)])
    if len(boot):
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    else:
        lo = hi = np.full(len(point), np.nan)
    if median:
        point = np.median(boot, axis=0) if len(boot) else np.full(len(point), np.nan)
    names = [*class_names, "mean"]
    rows = zip(names, point, lo, hi, strict=True)
    return {name: (float(p), float(low), float(high)) for name, p, low, high in rows}


def _check_labels_scores(y_true, y_score, class_names) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_score.shape != y_true.shape or len(y_true) == 0:
        raise ValueError(
            f"y_true and y_score: expected equal [N, C] shapes with N >= 1, got "
            f"{y_true.shape} and {y_score.shape}"
        )
    if len(class_names) != y_true.shape[1] or "mean" in class_names:
        raise ValueError(
            f"class_names: expected {y_true.shape[1]} names other than 'mean', got "
            f"{list(class_names)}"
        )
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true: labels must be 0 or 1 (one-hot)")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score: contains NaN or infinite scores")
    return y_true, y_score


# --- agreement of maps with gaze -----------------------------------------------------------


def pearson_cc(pred: np.ndarray, gaze: np.ndarray) -> np.ndarray:
    """Pearson correlation of each predicted map with its gaze map, over the pixels.

    1 is perfect agreement, 0 none, -1 opposite. A constant map predicts nothing, so an image
    where either map is constant scores 0 (chance) rather than an undefined 0/0.

    Shape:
        pred [N, H, W], gaze [N, H, W] -> [N].
    """
    p, g = (_centred(x) for x in _flat_pair(pred, gaze))
    norm = np.sqrt((p * p).sum(1) * (g * g).sum(1))
    return np.divide((p * g).sum(1), norm, out=np.zeros(len(p)), where=norm > 0)


def kl_divergence(gaze: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """KL(gaze || pred) of each image, both maps taken as distributions over the pixels.

    Each map is divided by its sum; ``sum P log(eps + P / (Q + eps))`` with eps the float64
    machine epsilon (Bylinskii et al.), so a predicted map that is zero where gaze falls costs a
    large but finite amount. 0 is perfect; lower is better. An image whose gaze map is all zero
    has no distribution: NaN.

    Shape:
        gaze [N, H, W], pred [N, H, W] -> [N].
    """
    g, p = _flat_pair(gaze, pred)
    for name, x in (("gaze", g), ("pred", p)):
        if (x < 0).any():
            raise ValueError(f"{name}: a distribution must be non-negative (take |map| first)")
    g_sum, p_sum = g.sum(1, keepdims=True), p.sum(1, keepdims=True)
    g = g / np.where(g_sum > 0, g_sum, 1.0)
    p = p / np.where(p_sum > 0, p_sum, 1.0)
    kl = (g * np.log(EPS + g / (p + EPS))).sum(1)
    return np.where(g_sum[:, 0] > 0, kl, np.nan)


def nss(pred: np.ndarray, fixation_counts: np.ndarray) -> np.ndarray:
    """Normalised scanpath saliency: the standardised predicted map at the fixated pixels.

    The map is standardised per image (mean 0, standard deviation 1), then averaged over the
    pixels weighted by their fixation counts. 0 is chance, higher is better; it is how many
    standard deviations above its mean the map is where the radiologist looked. A constant map
    scores 0; an image without fixations has no NSS: NaN.

    Shape:
        pred [N, H, W], fixation_counts [N, H, W] (non-negative counts) -> [N].
    """
    p, counts = _flat_pair(pred, fixation_counts)
    p = _centred(p)
    std = p.std(axis=1, keepdims=True)
    z = np.divide(p, std, out=np.zeros_like(p), where=std > 0)
    total = counts.sum(1)
    return np.divide((z * counts).sum(1), total, out=np.full(len(p), np.nan), where=total > 0)


def map_agreement(
    pred: np.ndarray, gaze: np.ndarray, fixations: np.ndarray
) -> dict[str, float]:
    """Mean CC, KL(gaze || pred) and NSS of predicted maps against the radiologist's gaze.

    Each metric is computed per image and averaged over the images where it is defined (see
    `pearson_cc`, `kl_divergence`, `nss`); NaN when it is defined for none.

    Args:
        pred: non-negative predicted maps, e.g. |saliency| summed over channels or the decoder's
            mask probabilities.
        gaze: static eye-gaze heatmaps.
        fixations: fixation counts per pixel at the maps' resolution.

    Shape:
        pred [N, H, W], gaze [N, H, W], fixations [N, H, W].
    """
    per_image = {
        "cc": pearson_cc(pred, gaze),
        "kl": kl_divergence(gaze, pred),
        "nss": nss(pred, fixations),
    }
    return {k: _mean_defined(v) for k, v in per_image.items()}


def _flat_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"maps: expected two equal [N, H, W] shapes, got {a.shape} and {b.shape}")
    return a.reshape(len(a), -1), b.reshape(len(b), -1)


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=1, keepdims=True)


def _mean_defined(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")
