"""`gazetune export NAME`: a study's MLflow runs turned into `reports/NAME/`.

MLflow is the source of truth: every trial's child run holds its params (the full trial config),
its per-epoch validation AUCs and its best checkpoint. A trial is scored at its best validation
epoch (where `val/auc/mean` peaks, the epoch its checkpoint holds), not at its last one, and the
report is written from those scores:

    best_configs.json   the top-k trials, best first (`test` stays null until `evaluate`)
    summary.md          the best trial of each loss set x generator beside the paper's numbers
    figures/            AUC per configuration, the search's history, Optuna's importances and
                        the heatmap panels that each configuration's best run drew

Images appear only by position and class; no identifier of the dataset reaches a report. Every
file is written to a temporary name and moved into place, so a killed export leaves whole files
under their final names, and the next export deletes the temporaries it left.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from search import tracking
from search.names import check_name
from trainable.checkpoint import atomic_write, remove_stale_temporaries
from trainable.config import CLASS_NAMES, USES_GENERATOR, ConfigError, TrialConfig
from trainable.errors import GazetuneError

METRIC = "val/auc/mean"  # what the search selects by (trainable.loop.METRIC)
SCORES = ("mean", *CLASS_NAMES)  # the keys of `val` and `test`
DEFAULT_TOP_K = 10
BEST_CONFIGS, SUMMARY, FIGURES = "best_configs.json", "summary.md", "figures"
MIN_IMPORTANCE_TRIALS = 3  # fANOVA runs with 2, but 2 scores say nothing about 4 parameters
PANELS_PREFIX = "val_heatmaps_"  # heatmap panels copied from each configuration's best run

# Watanabe et al. 2022, as published: mean (auc, lo, hi) and per-class AUC on their test
# split of about 100 images. Keys: (loss_set, generator or None).
PAPER = {
    ("baseline", None): ("baseline U-Net", (0.872, 0.840, 0.897), (0.923, 0.916, 0.781)),
    ("classifier", None): ("classifier only", (0.873, 0.838, 0.908), (0.878, 0.934, 0.805)),
    ("set1", "guided_backprop"): ("set1 guided backprop", (0.891, 0.847, 0.939),
                                  (0.896, 0.946, 0.831)),
    ("set1", "deconvnet"): ("set1 deconvnet", (0.884, 0.843, 0.935), (0.916, 0.935, 0.806)),
    ("set2", "guided_backprop"): ("set2 guided backprop", (0.897, 0.848, 0.921),
                                  (0.907, 0.922, 0.850)),
    ("set2", "deconvnet"): ("set2 deconvnet", (0.881, 0.828, 0.907), (0.885, 0.922, 0.827)),
    ("set3", "guided_backprop"): ("set3 guided backprop", (0.913, 0.860, 0.966),
                                  (0.921, 0.962, 0.859)),
    ("set3", "deconvnet"): ("set3 deconvnet", (0.860, 0.806, 0.907), (0.907, 0.934, 0.741)),
}


@dataclass(frozen=True)
class Trial:
    """One trial of a study as MLflow recorded it, scored at its best validation epoch."""

    run_id: str
    number: int  # 1-based, in order of start
    status: str  # the run's status: FINISHED, FAILED, RUNNING, KILLED
    pruned: bool  # stopped early by the scheduler (tag `pruned`)
    params: dict  # as logged (strings)
    epochs: int  # epochs logged
    epoch: int | None  # the best validation epoch (None: no validation score)
    val: dict | None  # {name: [auc, lo, hi]} at that epoch, NaN as None
    figures: tuple[str, ...] = field(default=())  # artifact paths under figures/
    parent: str | None = None  # the search's parent run

    @property
    def state(self) -> str:
        """Optuna's word for how the trial ended: COMPLETE, PRUNED, FAIL or RUNNING."""
        if self.status == "FINISHED":
            return "PRUNED" if self.pruned else "COMPLETE"
        return "FAIL" if self.status in ("FAILED", "KILLED") else "RUNNING"

    @property
    def score(self) -> float | None:
        return (self.val or {}).get("mean", [None])[0]

    @property
    def method(self) -> tuple[str, str | None]:
        """(loss set, generator), the generator only for the loss sets that compute a map."""
        loss_set = self.params.get("loss_set", "baseline")
        generator = self.params.get("generator", "guided_backprop")
        return loss_set, generator if loss_set in USES_GENERATOR else None

    def config(self) -> dict:
        """The trial's config, typed (params are strings); the scratch folder left out."""
        config = typed_config(self.params)
        config.pop("checkpoint_dir")  # the trial's scratch folder; the checkpoint is in its run
        return config


def typed_config(params: Mapping[str, str]) -> dict:
    """A run's params (strings) as the trial's typed config.

    MLflow logged `None` as "None"; it is turned back into None first, since TrialConfig keeps
    a string for a `str | None` key (the encoder weights' file would be called "None").
    """
    return TrialConfig.from_dict({k: None if v == "None" else v
                                  for k, v in params.items()}).to_dict()


def export(name: str, tracking_uri: str | None = None, reports: str | Path = "reports",
           top_k: int = DEFAULT_TOP_K, workdir: Path | None = None) -> Path:
    """Write `reports/<name>/` from the study's MLflow runs; returns that folder.

    Args:
        name: the study (= the MLflow experiment's name).
        tracking_uri: http(s)://HOST:PORT or sqlite:///PATH; None for `<workdir>/mlflow.db`.
        reports: the folder holding one report folder per study (relative to `workdir`).
        top_k: how many trials `best_configs.json` lists.
        workdir: where relative paths are taken from (default: the current directory).

    Raises:
        GazetuneError: the study does not exist or no trial has a validation score yet.
    """
    workdir = Path(workdir or Path.cwd())
    check_name(name)
    if not 1 <= top_k <= 10_000:
        raise ConfigError(f"--top-k must be in [1, 10000], got {top_k}")
    uri = tracking.resolve_tracking_uri(tracking_uri, workdir)
    trials = read_trials(uri, name)
    ranked = ranked_trials(trials)
    if not ranked:
        raise GazetuneError(f"study {name!r} at {uri}: no finished trial with a validation score "
                            f"yet ({len(trials)} trial run(s))")
    out = claim_report_folder(absolute(reports, workdir) / name)
    remove_stale_temporaries(out, out / FIGURES)

    write_json(out / BEST_CONFIGS, best_configs(ranked[:top_k], previous=out / BEST_CONFIGS))
    space = _space_name(uri, trials)
    searched = {t.run_id: sampled_params(t, space) for t in trials}
    rows = configuration_rows(ranked)
    panels = _copy_panels(rows, uri, out / FIGURES)
    origin = data_origin_of(ranked[0])
    drawn = _draw_figures(rows, trials, space, out / FIGURES, origin)
    write_text(out / SUMMARY, summary_markdown(name, trials, rows, searched, panels, origin,
                                               drawn))
    print(f"report of study {name!r} ({len(trials)} trials) written to {out}")
    return out


# ---------------------------------------------------------------------------------------------
# Reading the study from MLflow


def read_trials(tracking_uri: str, name: str) -> list[Trial]:
    """Every trial run of study `name`, oldest first, scored at its best validation epoch.

    Raises:
        GazetuneError: no experiment of that name in the tracking store.
    """
    client = mlflow_client(tracking.existing_store(tracking_uri))
    if client.get_experiment_by_name(name) is None:
        raise GazetuneError(f"no study {name!r} in the MLflow store {tracking_uri} (the study "
                            f"name is the experiment's name; check --tracking-uri)")
    trials = []
    for number, run in enumerate(tracking.find_trial_runs(tracking_uri, name), start=1):
        history = {key: _by_step(client.get_metric_history(run.info.run_id, key))
                   for key in run.data.metrics if key.startswith("val/auc/")}
        epoch = best_epoch(history.get(METRIC, {}))
        val = None
        if epoch is not None:
            val = {n: [finite(history.get(f"val/auc/{n}{b}", {}).get(epoch))
                       for b in ("", "/lo", "/hi")] for n in SCORES}
        figures = ()
        if "figures" in {a.path for a in client.list_artifacts(run.info.run_id)}:
            figures = tuple(a.path for a in client.list_artifacts(run.info.run_id, "figures")
                            if a.path.endswith(".png"))
        trials.append(Trial(
            run_id=run.info.run_id, number=number, status=run.info.status,
            pruned=run.data.tags.get("pruned") == "true", params=dict(run.data.params),
            epochs=max(history.get(METRIC) or [0]), epoch=epoch, val=val, figures=figures,
            parent=run.data.tags.get(tracking.PARENT_TAG),
        ))
    return trials


def best_epoch(history: Mapping[int, float]) -> int | None:
    """The step where the metric peaks (the earliest of equal peaks, as the loop keeps the first
    checkpoint to reach a value); None when no step has a finite value."""
    peaks = [(value, -step) for step, value in history.items() if math.isfinite(value)]
    return -max(peaks)[1] if peaks else None


def ranked_trials(trials: Iterable[Trial]) -> list[Trial]:
    """Finished trials with a validation score, best first (ties: the higher lower bound)."""
    scored = [t for t in trials if t.status == "FINISHED" and t.score is not None]
    return sorted(scored, key=lambda t: (-t.score, -(t.val["mean"][1] or 0.0), t.number))


def _by_step(metrics) -> dict[int, float]:
    """{step: value}; a step logged twice (a trial retried after a crash) keeps the latest."""
    return {m.step: m.value for m in sorted(metrics, key=lambda m: m.timestamp)}


def _space_name(tracking_uri: str, trials: list[Trial]) -> str:
    """The search space the study used, from its parent run's params (`paper` if unknown)."""
    client = mlflow_client(tracking_uri)
    for parent in sorted({t.parent for t in trials if t.parent}):
        space = client.get_run(parent).data.params.get("space")
        if space:
            return space
    return "paper"


# ---------------------------------------------------------------------------------------------
# best_configs.json


def best_configs(ranked: list[Trial], previous: Path | None = None) -> list[dict]:
    """The report's list of best trials; `test` kept from a previous export's evaluation."""
    tested = {}
    if previous is not None and previous.is_file():
        tested = {item["run_id"]: item.get("test") for item in json.loads(previous.read_text())}
    return [{"run_id": t.run_id, "config": t.config(), "val": t.val,
             "test": tested.get(t.run_id), "checkpoint_uri": checkpoint_uri(t.run_id)}
            for t in ranked]


def checkpoint_uri(run_id: str) -> str:
    """Where a trial's best checkpoint lives, for `mlflow.artifacts.download_artifacts`."""
    return f"runs:/{run_id}/checkpoint"


# ---------------------------------------------------------------------------------------------
# summary.md


@dataclass(frozen=True)
class Row:
    """The best trial of one loss set x generator, with how many trials tried it."""

    method: tuple[str, str | None]
    best: Trial
    trials: int

    @property
    def label(self) -> str:
        if self.method in PAPER:
            return PAPER[self.method][0]
        loss_set, generator = self.method
        return f"{loss_set} {generator.replace('_', ' ')}" if generator else loss_set

    @property
    def slug(self) -> str:
        return "_".join(part for part in self.method if part)


def configuration_rows(ranked: list[Trial]) -> list[Row]:
    """One row per loss set x generator, the paper's order first, then the others by score."""
    rows: dict = {}
    for trial in ranked:
        if trial.method in rows:
            rows[trial.method] = Row(trial.method, rows[trial.method].best,
                                     rows[trial.method].trials + 1)
        else:
            rows[trial.method] = Row(trial.method, trial, 1)
    paper = [rows[m] for m in PAPER if m in rows]
    return paper + [r for m, r in rows.items() if m not in PAPER]


def data_origin_of(trial: Trial) -> str:
    """"synthetic", "real" or "unknown": what the trial's cache was prepared from."""
    from trainable.data.cache import data_origin

    return data_origin(trial.params.get("cache", ""))


# What a reader must know about the data before reading any AUC of a report.
DATA_NOTES = {
    "synthetic": "**Data: synthetic** (`gazetune synth`: phantom radiographs with simulated "
                 "gaze, no patient). These AUCs show that the pipeline learns; they say nothing "
                 "clinical and are not comparable with the paper's numbers on the real release.",
    "real": "Data: prepared from a release in the EGD-CXR / MIMIC-CXR layout (real "
            "radiographs).",
    "unknown": "Data: the trial's cache could not be read here, so whether it is synthetic or "
               "real is not known.",
}
PAPER_SOURCE = "paper: test split of the real release"


def summary_markdown(name: str, trials: list[Trial], rows: list[Row], searched: Mapping,
                     panels: Mapping[str, str], origin: str = "unknown",
                     figures: Iterable[str] = ()) -> str:
    """The report's summary: the paper's table shape, our validation AUCs beside its numbers."""
    states = [t.state for t in trials]
    best = rows and max((r.best for r in rows), key=lambda t: t.score)
    cfg = best.config() if best else {}
    protocol = (f"{cfg.get('n_boot') or 'the default number of'} {cfg.get('boot_protocol')} "
                f"bootstrap resamples, 95% percentile intervals")
    lines = [
        f"# Study `{name}`",
        "",
        f"Trials: {len(trials)}; ran their full budget: {states.count('COMPLETE')}; stopped "
        f"early by ASHA (pruned): {states.count('PRUNED')}; failed: {states.count('FAIL')}"
        + (f"; still running: {states.count('RUNNING')}" if "RUNNING" in states else "") + ".",
        "",
        DATA_NOTES[origin],
        "",
        "## Best trial of each configuration (validation split)",
        "",
        f"Validation AUC (one-vs-rest, {protocol}) at each trial's best validation epoch, the "
        "epoch its checkpoint holds. The rows marked paper are Watanabe et al. (2022): test "
        "AUCs on their test split of about 100 real radiographs, a different split and, "
        f"{'here, different data' if origin == 'synthetic' else 'perhaps, different data'}. "
        "`gazetune evaluate` gives this study's test numbers (evaluation.md).",
        "",
        "| model | source | mean (95% CI) | Normal | CHF | pneumonia |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        t = row.best
        source = (f"this study: {origin} validation, trial {t.number} (best of {row.trials}), epoch "
                  f"{t.epoch} of {t.epochs}{', pruned' if t.pruned else ''}")
        cells = " | ".join(format_auc(t.val[n]) for n in SCORES)
        lines.append(f"| {row.label} | {source} | {cells} |")
        if row.method in PAPER:
            _, mean, per_class = PAPER[row.method]
            lines.append(f"| | {PAPER_SOURCE} | " + " | ".join(
                [format_auc(mean), *(f"{auc:.3f}" for auc in per_class)]) + " |")
    lines += ["", "## Figures", ""]
    captions = {"auc_by_configuration.png": "AUC per configuration",
                "search_history.png": "Search history", "importance.png":
                "Hyperparameter importance (fANOVA over completed trials)"}
    lines += [f"![{caption}](figures/{file})\n" for file, caption in captions.items()
              if file in figures]
    for label, path in panels.items():
        lines += [f"Heatmap panels of {label}'s best run (validation images by class, "
                  f"correctly classified ones where it had any): ![{label}]({path})", ""]
    lines += ["## All trials", "", "In order of start. Score: validation mean AUC at the best "
              "epoch.", "", "| trial | method | searched parameters | ended | epochs | score |",
              "| --- | --- | --- | --- | --- | --- |"]
    for t in trials:
        params = ", ".join(f"{k}={_short(v)}" for k, v in searched.get(t.run_id, {}).items()
                           if k not in ("loss_set", "generator"))
        method = "/".join(p for p in t.method if p)
        score = "–" if t.score is None else f"{t.score:.3f} (epoch {t.epoch})"
        lines.append(f"| {t.number} | {method} | {params or '–'} | {t.state.lower()} | "
                     f"{t.epochs} | {score} |")
    best_line = (f"Best trial: {best.number}, MLflow run `{best.run_id}`, checkpoint "
                 f"`{checkpoint_uri(best.run_id)}`." if best else "")
    return "\n".join(lines + ["", best_line, ""])


def format_auc(value) -> str:
    """[auc, lo, hi] as "0.812 (0.750–0.870)"; "–" when there is no AUC."""
    auc, lo, hi = value
    if auc is None:
        return "–"
    interval = f" ({lo:.3f}–{hi:.3f})" if lo is not None and hi is not None else ""
    return f"{auc:.3f}{interval}"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# Figures


def sampled_params(trial: Trial, space: str) -> dict:
    """The parameters the search space chose for a trial, typed, in the order it chose them.

    The space is replayed on an `optuna.trial.FixedTrial` holding the trial's config: the
    branch the trial took suggests exactly the parameters it used. {} when the config does not
    fit the space (a run of another space, or of `gazetune train`).
    """
    return {name: value for name, (value, _) in _replay(trial, space).items()}


def importances(trials: list[Trial], space: str) -> tuple[dict[str, float], str]:
    """Optuna's hyperparameter importances (fANOVA) over the completed trials, and a note.

    An in-memory study is rebuilt from the runs (`create_trial` + `add_trial`). Optuna then
    takes the parameters every completed trial has: a conditional one (a generator, Set 3's
    ratio) is left out unless every trial took its branch. With fewer than
    `MIN_IMPORTANCE_TRIALS` completed trials or no spread of scores there is nothing to
    attribute, and the result is empty.
    """
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for trial in trials:
        replayed = _replay(trial, space)
        if trial.state != "COMPLETE" or trial.score is None or not replayed:
            continue
        study.add_trial(optuna.trial.create_trial(
            params={k: v for k, (v, _) in replayed.items()},
            distributions={k: d for k, (_, d) in replayed.items()},
            value=trial.score, state=TrialState.COMPLETE))
    done = study.get_trials(states=(TrialState.COMPLETE,))
    if len(done) < MIN_IMPORTANCE_TRIALS or len({t.value for t in done}) < 2:
        return {}, f"{len(done)} completed trial(s): too few to attribute scores"
    # A parameter every completed trial shares (the paper points fix lr and dropout) explains
    # nothing; fANOVA would still rank it.
    shared = set.intersection(*(set(t.params) for t in done))
    varied = sorted(k for k in shared if len({repr(t.params[k]) for t in done}) > 1)
    if not varied:
        return {}, f"no parameter varied over the {len(done)} completed trials"
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        values = optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                         params=varied)
    except (ValueError, RuntimeError) as err:  # e.g. no parameter shared by every trial
        return {}, f"not computable: {err}"
    values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    return values, f"fANOVA over {len(done)} completed trials"


def _replay(trial: Trial, space: str) -> dict:
    """{name: (value, distribution)} the space suggests for the trial's config; {} if none."""
    import optuna

    from spaces import get_space

    try:
        fixed = optuna.trial.FixedTrial(typed_config(trial.params))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a value outside the space's range only warns
            get_space(space)(fixed)
    except (ConfigError, KeyError, ValueError):
        return {}
    return {k: (v, fixed.distributions[k]) for k, v in fixed.params.items()}


def _draw_figures(rows: list[Row], trials: list[Trial], space: str, folder: Path,
                  origin: str) -> list[str]:
    """Draw the study's charts; the names of those drawn (importance only when computable)."""
    from trainable.figures import (
        auc_interval_chart,
        importance_chart,
        save_figure,
        search_history_chart,
    )

    chart_rows = [{"label": r.label, "auc": r.best.val["mean"][0],
                   "lo": _or(r.best.val["mean"][1], r.best.val["mean"][0]),
                   "hi": _or(r.best.val["mean"][2], r.best.val["mean"][0]),
                   "reference": PAPER[r.method][1][0] if r.method in PAPER else None}
                  for r in rows]
    fig = auc_interval_chart(chart_rows, reference_label="paper: test AUC, real release",
                             label=f"this study: validation AUC (95% CI), {origin} data")
    fig.suptitle(f"this study: validation mean AUC of each configuration's best trial "
                 f"({origin} data)", fontsize=9)
    save_figure(fig, folder / "auc_by_configuration.png")

    history = [{"number": t.number, "value": t.score, "state": t.state} for t in trials]
    save_figure(search_history_chart(history, metric="val mean AUC (best epoch)"),
                folder / "search_history.png")
    drawn = ["auc_by_configuration.png", "search_history.png"]

    values, note = importances(trials, space)
    stale = folder / "importance.png"
    if values:
        save_figure(importance_chart(values, title=f"hyperparameter importance ({note})"), stale)
        drawn.append(stale.name)
    elif stale.is_file():  # an earlier export drew it; what it showed no longer holds
        stale.unlink()
    return drawn


def _copy_panels(rows: list[Row], tracking_uri: str, folder: Path) -> dict[str, str]:
    """Copy each configuration's best run's heatmap panels; {label: path in the report}."""
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    copied = {}
    with tempfile.TemporaryDirectory(prefix="gazetune-export-") as scratch:
        for row in rows:
            for artifact in row.best.figures[:1]:  # one figure per run (val_<generator>.png)
                local = mlflow.artifacts.download_artifacts(
                    run_id=row.best.run_id, artifact_path=artifact, dst_path=scratch,
                    tracking_uri=tracking_uri)
                target = folder / f"{PANELS_PREFIX}{row.slug}.png"
                write_bytes(target, Path(local).read_bytes())
                copied[row.label] = f"{FIGURES}/{target.name}"
    for stale in folder.glob(f"{PANELS_PREFIX}*.png"):  # configurations no longer in the study
        if f"{FIGURES}/{stale.name}" not in copied.values():
            stale.unlink()
    return copied


# ---------------------------------------------------------------------------------------------
# Files


# export always writes best_configs.json, evaluate evaluation.json: a folder with either is a
# report of this tool.
REPORT_MARKS = (BEST_CONFIGS, "evaluation.json")


def claim_report_folder(out: Path) -> Path:
    """`out`, created with its figures/ folder, unless it already holds files and is not a
    report this tool wrote (then nothing is written).

    Raises:
        GazetuneError: `out` is a file, or a folder with other content and no report in it.
    """
    if out.exists() and not out.is_dir():
        raise GazetuneError(f"{out} is a file, not a report folder")
    # An empty figures/ folder is what a claim before a failed evaluation leaves.
    content = [p for p in out.iterdir() if not (p.name == FIGURES and p.is_dir()
                                                and not any(p.iterdir()))] if out.is_dir() else []
    if content and not any((out / mark).is_file() for mark in REPORT_MARKS):
        raise GazetuneError(f"{out} holds files that gazetune did not write: reports go into a "
                            f"new folder or one that export or evaluate wrote (choose another "
                            f"--reports)")
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, obj) -> None:
    """Strict JSON (NaN refused: missing values are null), written atomically."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def mlflow_client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri)


def finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _or(value, default):
    return default if value is None else value


def absolute(path: str | Path, workdir: Path) -> Path:
    """`path` taken from `workdir` unless it is absolute."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else workdir / path
