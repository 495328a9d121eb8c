"""Figures: panel layout, valid PNGs written atomically, absent panels and empty inputs."""

import os

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from search.charts import auc_interval_chart, importance_chart, search_history_chart
from trainable.figures import heatmap_panels, save_figure


def maps(n=3, size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size))


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def read_png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_heatmap_panels_have_n_by_4_axes_and_save_a_png(tmp_path):
    signed = maps(seed=1) - 0.5  # a generator map is signed; drawn as |map|
    fig = heatmap_panels(maps(), signed, maps(seed=2), maps(seed=3), titles=["Normal p=0.9"] * 3)
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3 * 4
    assert [ax.get_title() for ax in image_axes[:4]] == [
        "input", "generator map", "gaze map", "decoder mask"
    ]
    assert image_axes[0].get_ylabel() == "Normal p=0.9"
    overlay = image_axes[1].images[1].get_array()
    assert overlay.min() >= 0 and overlay.max() == pytest.approx(1.0)
    width, height = fig.get_size_inches() * fig.dpi
    path = save_figure(fig, tmp_path / "figures" / "panels.png")
    png = read_png(path)
    assert png.shape[:2] == (round(height), round(width)) and png.shape[2] in (3, 4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["panels.png"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file, not 0600
    assert plt.get_fignums() == []  # pyplot never saw it


def test_absent_generator_and_mask_panels_read_n_a(tmp_path):
    fig = heatmap_panels(maps(2), None, maps(2), None)
    assert texts(fig).count("n/a") == 4
    assert sum(1 for ax in fig.axes if ax.images) == 2 * 2  # input and gaze panels only
    assert read_png(save_figure(fig, tmp_path / "n_a.png")).ndim == 3


def test_heatmap_panels_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="masks"):
        heatmap_panels(maps(2), None, maps(2), maps(3))


def test_auc_interval_chart_with_reference_points(tmp_path):
    rows = [
        {"label": "set3 guided_backprop", "auc": 0.91, "lo": 0.86, "hi": 0.96, "reference": 0.913},
        {"label": "baseline", "auc": 0.87, "lo": 0.84, "hi": 0.90},
    ]
    fig = auc_interval_chart(rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["set3 guided_backprop", "baseline"]
    assert ax.yaxis_inverted()  # first row at the top
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["AUC (95% CI)", "paper"]
    assert read_png(save_figure(fig, tmp_path / "auc.png")).shape[2] in (3, 4)


def test_search_history_chart_marks_pruned_and_tracks_best(tmp_path):
    trials = [
        {"number": 0, "value": 0.70, "state": "COMPLETE"},
        {"number": 1, "value": 0.60, "state": "PRUNED"},
        {"number": 2, "value": 0.80, "state": "COMPLETE"},
        {"number": 3, "value": 0.75, "state": "COMPLETE"},
        {"number": 4, "value": None, "state": "FAIL"},
    ]
    fig = search_history_chart(trials)
    ax = fig.axes[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(legend) == ["best so far", "complete (3)", "pruned (1)"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.70, 0.80, 0.80])
    assert ax.get_title() == "5 trials, 1 without a score"
    assert read_png(save_figure(fig, tmp_path / "history.png")).ndim == 3


def test_importance_chart_largest_on_top(tmp_path):
    fig = importance_chart({"lr": 0.6, "loss_set": 0.3, "r": 0.1})
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["r", "loss_set", "lr"]  # bottom to top
    assert read_png(save_figure(fig, tmp_path / "importance.png")).ndim == 3


@pytest.mark.parametrize(
    "draw, message",
    [
        (lambda: auc_interval_chart([]), "No configurations"),
        (lambda: search_history_chart([{"number": 0, "value": None, "state": "FAIL"}]),
         "No trial"),
        (lambda: importance_chart({}), "No hyperparameter importances"),
    ],
)
def test_empty_inputs_draw_a_clear_message(draw, message, tmp_path):
    fig = draw()
    assert any(message in t for t in texts(fig))
    assert read_png(save_figure(fig, tmp_path / "empty.png")).ndim == 3
