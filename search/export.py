"""`gazetune export NAME`: a study's MLflow runs turned into `reports/NAME/`.

MLflow is the source of truth: every trial's child run holds its params (the trial config's keys
that apply to its loss set; the whole config in config.json), its per-epoch validation AUCs and
its best checkpoint. A trial is scored at its best validation epoch (where `val/auc/mean`
peaks, the epoch its checkpoint holds), not at its last one, and the report is written from
those scores:

    best_configs.json   the top-k trials, best first (`test`: the study's latest evaluation of
                        the trial in MLflow, null until `evaluate`)
    summary.md          the best trial of each loss set x generator beside the paper's numbers
    optuna.db           the study for `optuna.load_study` and optuna-dashboard
    figures/            AUC per configuration, the search's history, Optuna's importances and
                        the heatmap panels that each configuration's best run drew

The next export deletes the temporaries a killed one left (`search.reporting` writes every file
atomically).
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from search import tracking
from search.names import check_name
from search.registry import check_model_name, register_best
from search.reporting import (
    BEST_CONFIGS,
    DATA_NOTES,
    FIGURES,
    PAPER,
    PAPER_SOURCE,
    SUMMARY,
    claim_report_folder,
    format_auc,
    write_bytes,
    write_json,
    write_text,
)
from search.storage import absolute
from search.study import (
    SCORES,
    Trial,
    checkpoint_uri,
    data_origin_of,
    ranked_trials,
    read_evaluations,
    read_trials,
    space_name,
    typed_config,
)
from trainable.config import METRIC, ConfigError
from trainable.errors import GazetuneError
from trainable.files import remove_stale_temporaries

DEFAULT_TOP_K = 10
MIN_IMPORTANCE_TRIALS = 3  # fANOVA runs with 2, but 2 scores say nothing about 4 parameters
OPTUNA_STUDY = "optuna.db"  # the study for optuna.load_study and optuna-dashboard
PANELS_PREFIX = "val_heatmaps_"  # heatmap panels copied from each configuration's best run


def export(name: str, tracking_uri: str | None = None, reports: str | Path = "reports",
           top_k: int = DEFAULT_TOP_K, workdir: Path | None = None,
           register: str | None = None) -> Path:
    """Write `reports/<name>/` from the study's MLflow runs; returns that folder.

    Args:
        name: the study (= the MLflow experiment's name).
        tracking_uri: http(s)://HOST:PORT or sqlite:///PATH; None for `<workdir>/mlflow.db`.
        reports: the folder holding one report folder per study (relative to `workdir`).
        top_k: how many trials `best_configs.json` lists.
        workdir: where relative paths are taken from (default: the current directory).
        register: a registered model's name: the best trial's checkpoint, logged as an MLflow
            Model of its run (once), becomes a version of it (`search.registry`).

    Raises:
        GazetuneError: the study does not exist or no trial has a validation score yet.
    """
    workdir = Path(workdir or Path.cwd())
    check_name(name)
    if register is not None:
        check_model_name(register)
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

    write_json(out / BEST_CONFIGS, best_configs(ranked[:top_k], previous=out / BEST_CONFIGS,
                                                evaluated=read_evaluations(uri, name)))
    space = space_name(uri, trials)
    searched = {t.run_id: sampled_params(t, space) for t in trials}
    rows = configuration_rows(ranked)
    panels = _copy_panels(rows, uri, out / FIGURES)
    origin = data_origin_of(ranked[0])
    drawn = _draw_figures(rows, trials, space, out / FIGURES, origin)
    write_optuna_study(out / OPTUNA_STUDY, name, trials, space)
    write_text(out / SUMMARY, summary_markdown(name, trials, rows, searched, panels, origin,
                                               drawn))
    print(f"report of study {name!r} ({len(trials)} trials) written to {out}")
    if register is not None:
        _register(uri, ranked[0], register)
    return out


def _register(uri: str, best: Trial, model_name: str) -> None:
    """`--register`: the best trial's checkpoint into the Model Registry; says where it went."""
    done = register_best(uri, best.run_id, model_name, epoch=best.epoch)
    how = "logged as" if done.logged else "already logged as"
    print(f"best trial {best.number} (run {best.run_id}): {how} MLflow model {done.model_uri} "
          f"(runs:/{best.run_id}/{tracking.MODEL_NAME}); registered as {done.uri}")


# ---------------------------------------------------------------------------------------------
# best_configs.json


def best_configs(ranked: list[Trial], previous: Path | None = None,
                 evaluated: Mapping[str, dict] | None = None) -> list[dict]:
    """The report's list of best trials; `test` from the study's evaluations in MLflow
    (`evaluated`), else kept from a previous export's file."""
    tested = {}
    if previous is not None and previous.is_file():
        tested = {item["run_id"]: item.get("test") for item in json.loads(previous.read_text())}
    tested.update(evaluated or {})
    return [{"run_id": t.run_id, "config": t.config(), "val": t.val,
             "test": tested.get(t.run_id), "checkpoint_uri": checkpoint_uri(t.run_id)}
            for t in ranked]


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


def summary_markdown(name: str, trials: list[Trial], rows: list[Row], searched: Mapping,
                     panels: Mapping[str, str], origin: str = "unknown",
                     figures: Iterable[str] = ()) -> str:
    """The report's summary: the paper's table shape, our validation AUCs beside its numbers."""
    states = [t.state for t in trials]
    best = rows and max((r.best for r in rows), key=lambda t: t.score)
    cfg = best.config() if best else {}
    protocol = (f"{cfg.get('n_boot') or 'the default number of'} {cfg.get('boot_protocol')} "
                f"bootstrap resamples, 95% percentile intervals"
                + (", the median as the AUC" if cfg.get("boot_protocol") == "paper" else ""))
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
        (f"Validation AUC (one-vs-rest, {protocol}) at each trial's best validation epoch, the "
        "epoch its checkpoint holds. The rows marked paper are Watanabe et al. (2022): test "
        "AUCs on their test split of about 100 real radiographs, a different split and, "
        f"{'here, different data' if origin == 'synthetic' else 'perhaps, different data'}. "
        "`gazetune evaluate` gives this study's test numbers (evaluation.md)."),
        "",
        "| model | source | mean (95% CI) | Normal | CHF | pneumonia |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        t = row.best
        source = (f"this study: {origin} validation, trial {t.number} (best of {row.trials}), "
                  f"epoch {t.epoch} of {t.epochs}{', pruned' if t.pruned else ''}")
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
        lines += [(f"Heatmap panels of {label}'s best run (validation images by class, "
                  f"correctly classified ones where it had any): ![{label}]({path})"), ""]
    lines += ["## All trials", "", ("In order of start. Score: validation mean AUC at the best "
              "epoch."), "", "| trial | method | searched parameters | ended | epochs | score |",
              "| --- | --- | --- | --- | --- | --- |"]
    for t in trials:
        params = ", ".join(f"{k}={_short(v)}" for k, v in searched.get(t.run_id, {}).items()
                           if k not in ("loss_set", "generator"))
        score = "–" if t.score is None else f"{t.score:.3f} (epoch {t.epoch})"
        lines.append(f"| {t.number} | {t.label} | {params or '–'} | {t.state.lower()} | "
                     f"{t.epochs} | {score} |")
    best_line = (f"Best trial: {best.number}, MLflow run `{best.run_id}`, checkpoint "
                 f"`{checkpoint_uri(best.run_id)}`." if best else "")
    return "\n".join(lines + ["", best_line, ""])


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
    study.add_trials([t for t in optuna_trials(trials, space)
                      if t.state == TrialState.COMPLETE and t.params])
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


def optuna_trials(trials: list[Trial], space: str) -> list:
    """The study's trials as Optuna's `FrozenTrial`s, in the order of their numbers: the
    parameters the space sampled, each epoch's validation AUC, and as the value of a complete
    trial its best epoch's (the checkpoint's). Trials still running are left out."""
    import optuna
    from optuna.trial import TrialState

    frozen = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == "RUNNING":
            continue
        replayed = _replay(trial, space)
        state = TrialState[trial.state]
        if state == TrialState.COMPLETE and trial.score is None:
            state = TrialState.FAIL  # no epoch had a defined score
        frozen.append(_timed(optuna.trial.create_trial(
            params={k: v for k, (v, _) in replayed.items()},
            distributions={k: d for k, (_, d) in replayed.items()},
            value=trial.score if state == TrialState.COMPLETE else None,
            intermediate_values={step: value for step, value in trial.history.items()
                                 if math.isfinite(value)},
            user_attrs={"mlflow_run_id": trial.run_id, "trial_number": trial.number,
                        **({"best_epoch": trial.epoch} if trial.epoch else {})},
            state=state), trial))
    return frozen


def _timed(frozen, trial: Trial):
    """The Optuna trial with its run's start and end (not the export's clock: an export written
    again from the same runs is the same file)."""
    from datetime import datetime

    if trial.started and trial.ended:  # else Optuna's own (a run that never ended)
        frozen.datetime_start = datetime.fromtimestamp(trial.started / 1000)
        frozen.datetime_complete = datetime.fromtimestamp(trial.ended / 1000)
    return frozen


def write_optuna_study(path: Path, name: str, trials: list[Trial], space: str) -> None:
    """The study as an Optuna storage file (SQLite) that `optuna.load_study` and
    optuna-dashboard open. Built in a scratch folder (SQLite keeps a journal beside the file
    while it writes), then written into the report in one step."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gazetune-optuna-") as scratch:
        db = Path(scratch) / OPTUNA_STUDY
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        try:
            study = optuna.create_study(study_name=name, storage=storage,
                                        direction="maximize")
            study.set_user_attr("metric", trials[0].metric if trials else METRIC)
            study.add_trials(optuna_trials(trials, space))
        finally:
            storage.engine.dispose()  # the file is closed before it is read
        write_bytes(path, db.read_bytes())


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
    from search.charts import auc_interval_chart, importance_chart, search_history_chart
    from trainable.figures import save_figure

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
    copied = {}
    with tempfile.TemporaryDirectory(prefix="gazetune-export-") as scratch:
        for row in rows:
            for artifact in row.best.figures[:1]:  # one figure per run (val_<generator>.png)
                local = tracking.download_artifact(tracking_uri, row.best.run_id, artifact,
                                                   scratch)
                target = folder / f"{PANELS_PREFIX}{row.slug}.png"
                write_bytes(target, Path(local).read_bytes())
                copied[row.label] = f"{FIGURES}/{target.name}"
    for stale in folder.glob(f"{PANELS_PREFIX}*.png"):  # configurations no longer in the study
        if f"{FIGURES}/{stale.name}" not in copied.values():
            stale.unlink()
    return copied


def _or(value, default):
    return default if value is None else value


