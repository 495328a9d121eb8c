"""Figures of one trial for MLflow and the reports: heatmap panels per image, and the canvas
every figure of the project is drawn on.

Every function builds a `matplotlib.figure.Figure` with its own Agg canvas and never touches
pyplot, so figures drawn in a training worker leak no global state and need no display.
Titles carry class names and probabilities only, never an image's identifiers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from trainable.files import atomic_write

PANEL_INCHES = 3.2
MAP_CMAP = "inferno"
MAP_ALPHA = 0.6  # enough of the radiograph shows through to place the map anatomically
FONT_SIZE = 11
PANEL_TITLES = ("input", "generator map", "gaze map", "decoder mask")


def new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas, outside pyplot."""
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
    fig = new_figure(4 * PANEL_INCHES, n * PANEL_INCHES)
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


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG atomically (a reader never sees a half-written file) and release it.

    The figure is not registered with pyplot, so there is nothing to close: it is cleared to free
    its artists. Returns the path written.
    """
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    fig.clear()
    return path


def message_figure(text: str) -> Figure:
    """A figure that only says `text` (a chart with nothing to draw yet)."""
    fig = new_figure(2 * PANEL_INCHES, PANEL_INCHES)
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

