"""The charts of a study's report: AUC per configuration, the search's history, importances.

Drawn like every figure of the project (`trainable.figures`): each on its own Agg canvas,
never through pyplot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from trainable.figures import FONT_SIZE, PANEL_INCHES, message_figure, new_figure


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
        return message_figure("No configurations to compare yet.")
    fig = new_figure(2 * PANEL_INCHES, 1.2 + 0.4 * len(rows))
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


def configurations_chart(rows: Sequence[Mapping], reference: float | None,
                         reference_label: str = "classifier only") -> Figure:
    """Test mean AUC with its interval per configuration, and the reference model's mean AUC
    as a vertical line (`auc_interval_chart` plus that line).

    Args:
        rows: as for `auc_interval_chart` (``label``, ``auc``, ``lo``, ``hi``).
        reference: the reference model's mean AUC; None when the study has none, which the
            title then says.
        reference_label: legend entry of the line.

    Returns:
        The figure; with no rows, one that says so.
    """
    fig = auc_interval_chart(rows, label="test mean AUC (95% CI)")
    if not rows:
        return fig
    ax = fig.axes[0]
    if reference is None:
        ax.set_title(f"no {reference_label} model in the study: no reference line",
                     fontsize=FONT_SIZE)
        return fig
    ax.axvline(reference, color="C3", linestyle="--",
               label=f"{reference_label} ({reference:.3f})")
    _legend_again(fig)  # to include the line
    return fig


def repeat_chart(rows: Sequence[Mapping]) -> Figure:
    """Each configuration's test mean AUC per seed (dots) and over seeds (the mean with its
    interval), first row at the top.

    Args:
        rows: one mapping per configuration with keys ``label``, ``auc``, ``lo``, ``hi`` (the
            mean over seeds and its interval) and ``seeds`` (each seed's AUC).

    Returns:
        The figure; with no rows, one that says so.
    """
    fig = auc_interval_chart(rows, label="mean over seeds (95% CI over seeds and images)")
    if not rows:
        return fig
    ax = fig.axes[0]
    for y, row in enumerate(rows):
        ax.scatter(row["seeds"], np.full(len(row["seeds"]), y + 0.18), marker=".",
                   color="0.4", label="one seed" if y == 0 else None)
    _legend_again(fig)  # to include the seeds
    return fig


def _legend_again(fig: Figure) -> None:
    """Replace `auc_interval_chart`'s legend with one of everything drawn since."""
    for legend in list(fig.legends):
        legend.remove()
    fig.legend(fontsize=FONT_SIZE - 1, loc="outside lower center", ncols=2)


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
        return message_figure("No trial has reported a validation score yet.")
    fig = new_figure(2 * PANEL_INCHES, 1.2 * PANEL_INCHES)
    ax = fig.add_subplot()
    for state, style in (("COMPLETE", {"marker": "o", "color": "C0"}),
                         ("PRUNED", {"marker": "x", "color": "0.5"})):
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
        return message_figure("No hyperparameter importances (too few completed trials).")
    names, values = zip(*sorted(importances.items(), key=lambda kv: kv[1]))  # largest last = top
    fig = new_figure(2 * PANEL_INCHES, 1.0 + 0.4 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, values, color="C0")
    ax.set_xlabel("importance", fontsize=FONT_SIZE)
    ax.set_title(title, fontsize=FONT_SIZE)
    ax.tick_params(labelsize=FONT_SIZE)
    return fig
