"""Figures for MLflow and the reports: heatmap panels per image and search-report charts.

Every function builds a `matplotlib.figure.Figure` with its own Agg canvas and never touches
pyplot, so figures drawn in a training worker leak no global state and need no display.
Titles carry class names and probabilities only, never an image's identifiers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from trainable.checkpoint import atomic_write

PANEL_INCHES = 3.2
MAP_CMAP = "inferno"
MAP_ALPHA = 0.6  # enough of the radiograph shows through to place the map anatomically
FONT_SIZE = 11
PANEL_TITLES = ("input", "generator map", "gaze map", "decoder mask")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def heatmap_panels(
    images: np.ndarray,
    gen_maps: np.ndarray | None,
    gaze: np.ndarray,
    masks: np.ndarray | None,
    titles: Sequence[str] | None = None,
) -> Figure:
    """One row per image: input | generator map | gaze map | decoder mask (the paper's figures).

    Each map is drawn as |map| divided by its own maximum, over the greyscale input, so every
    map panel shares the colour scale 0-1 of the one colourbar; the signed, unnormalised
    saliency of a generator is made comparable across images that way.

    Args:
        images: greyscale inputs (any range; each is min-max scaled for display).
        gen_maps: generator saliency maps (e.g. summed over channels), or None for a loss set
            without a generator; the panel then reads "n/a".
        gaze: static eye-gaze heatmaps.
        masks: decoder mask probabilities, or None for the classifier (no decoder).
        titles: one per row, e.g. "CHF  p=0.91" (class and probability, never identifiers).

    Returns:
        The figure, with N x 4 image axes (plus the colourbar's).

    Shape:
        images [N, H, W], gen_maps [N, H, W] or None, gaze [N, H, W], masks [N, H, W] or None.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3 or len(images) == 0:
        raise ValueError(f"images: expected [N, H, W] with N >= 1, got shape {images.shape}")
    columns = [gen_maps, gaze, masks]
    for name, maps in zip(("gen_maps", "gaze", "masks"), columns):
        if maps is not None and np.shape(maps) != images.shape:
            raise ValueError(f"{name}: expected shape {images.shape}, got {np.shape(maps)}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles: expected {len(images)}, got {len(titles)}")

    n = len(images)
    fig = _figure(4 * PANEL_INCHES, n * PANEL_INCHES)
    axes = fig.subplots(n, 4, squeeze=False)
    for row, image in enumerate(images):
        background = _unit_range(image)
        axes[row, 0].imshow(background, cmap="gray", vmin=0, vmax=1)
        for col, maps in enumerate(columns, start=1):
            ax = axes[row, col]
            if maps is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=FONT_SIZE + 4,
                        color="0.4", transform=ax.transAxes)
                ax.set_facecolor("0.92")
                continue
            ax.imshow(background, cmap="gray", vmin=0, vmax=1)
            ax.imshow(_peak_normalised(maps[row]), cmap=MAP_CMAP, vmin=0, vmax=1, alpha=MAP_ALPHA)
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(PANEL_TITLES[col], fontsize=FONT_SIZE + 1)
        if titles is not None:
            axes[row, 0].set_ylabel(titles[row], fontsize=FONT_SIZE)
    colorbar = fig.colorbar(
        ScalarMappable(Normalize(0, 1), cmap=MAP_CMAP), ax=axes, shrink=min(0.6, 2 / n),
        label="|map| / per-image max",
    )
    colorbar.ax.tick_params(labelsize=FONT_SIZE - 1)
    return fig


def auc_interval_chart(rows: Sequence[Mapping], reference_label: str = "paper",
                       label: str = "AUC (95% CI)") -> Figure:
    """AUC with its interval per configuration, as horizontal bars, best first as given.

    Args:
        rows: one mapping per configuration with keys ``label``, ``auc``, ``lo``, ``hi`` and
            optionally ``reference`` (e.g. the paper's published mean for that configuration),
            drawn as a hollow diamond.
        reference_label: legend entry of the reference points.
        label: legend entry of the rows' AUCs.

    Returns:
        The figure; with no rows, one that says so.
    """
    if not rows:
        return _message("No configurations to compare yet.")
    fig = _figure(2 * PANEL_INCHES, 1.2 + 0.4 * len(rows))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    auc = np.array([r["auc"] for r in rows], dtype=float)
    err = np.array([[r["auc"] - r["lo"], r["hi"] - r["auc"]] for r in rows], dtype=float).T
    ax.errorbar(auc, y, xerr=err, fmt="o", color="C0", capsize=4, label=label)
    ref = [(yi, r["reference"]) for yi, r in zip(y, rows) if r.get("reference") is not None]
    if ref:
        ry, rx = zip(*ref)
        ax.scatter(rx, ry, marker="D", facecolors="none", edgecolors="C3", zorder=3,
                   label=reference_label)
    ax.set_yticks(y, [str(r["label"]) for r in rows], fontsize=FONT_SIZE)
    ax.invert_yaxis()  # first row at the top
    ax.set_xlabel("AUC", fontsize=FONT_SIZE)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=FONT_SIZE - 1, loc="outside lower center", ncols=2)
    return fig


def search_history_chart(trials: Sequence[Mapping], metric: str = "val mean AUC") -> Figure:
    """Validation score of each trial in order, pruned trials marked, best-so-far line.

    Args:
        trials: one mapping per trial with keys ``number`` (order of start), ``value`` (last
            reported validation mean AUC, or None) and ``state`` (``"COMPLETE"``, ``"PRUNED"``,
            ``"FAIL"``, ...). Trials without a value are counted in the title only.
        metric: the y-axis label.

    Returns:
        The figure; with no scored trial, one that says so. The best-so-far line follows
        completed trials only: a pruned trial's score is from fewer epochs.
    """
    scored = sorted((t for t in trials if t.get("value") is not None), key=lambda t: t["number"])
    if not scored:
        return _message("No trial has reported a validation score yet.")
    fig = _figure(2 * PANEL_INCHES, 1.2 * PANEL_INCHES)
    ax = fig.add_subplot()
    for state, style in (("COMPLETE", dict(marker="o", color="C0")),
                         ("PRUNED", dict(marker="x", color="0.5"))):
        points = [(t["number"], t["value"]) for t in scored if t.get("state") == state]
        if points:
            ax.scatter(*zip(*points), label=f"{state.lower()} ({len(points)})", **style)
    complete = [(t["number"], t["value"]) for t in scored if t.get("state") == "COMPLETE"]
    if complete:
        number, value = zip(*complete)
        best = np.maximum.accumulate(value)
        ax.step(number, best, where="post", color="C1", label="best so far")
    unscored = len(trials) - len(scored)
    ax.set_title(f"{len(trials)} trials" + (f", {unscored} without a score" if unscored else ""),
                 fontsize=FONT_SIZE)
    ax.set_xlabel("trial number", fontsize=FONT_SIZE)
    ax.set_ylabel(metric, fontsize=FONT_SIZE)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=FONT_SIZE - 1, loc="outside lower center", ncols=3)
    return fig


def importance_chart(
    importances: Mapping[str, float], title: str = "hyperparameter importance"
) -> Figure:
    """Horizontal bars of each hyperparameter's importance, largest at the top.

    Args:
        importances: name -> importance, e.g. from `optuna.importance.get_param_importances`.
        title: the axes title.

    Returns:
        The figure; with no importances, one that says so.
    """
    if not importances:
        return _message("No hyperparameter importances (too few completed trials).")
    names, values = zip(*sorted(importances.items(), key=lambda kv: kv[1]))  # largest last = top
    fig = _figure(2 * PANEL_INCHES, 1.0 + 0.4 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, values, color="C0")
    ax.set_xlabel("importance", fontsize=FONT_SIZE)
    ax.set_title(title, fontsize=FONT_SIZE)
    ax.tick_params(labelsize=FONT_SIZE)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG atomically (a reader never sees a half-written file) and release it.

    The figure is not registered with pyplot, so there is nothing to close: it is cleared to free
    its artists. Returns the path written.
    """
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    fig.clear()
    return path


def _message(text: str) -> Figure:
    fig = _figure(2 * PANEL_INCHES, PANEL_INCHES)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=FONT_SIZE + 1, wrap=True)
    ax.set_axis_off()
    return fig


def _unit_range(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def _peak_normalised(x) -> np.ndarray:
    x = np.abs(np.asarray(x, dtype=np.float64))
    peak = x.max()
    return x / peak if peak > 0 else x

