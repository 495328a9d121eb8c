"""The search service: Ray Tune runs Optuna's suggestions under ASHA, MLflow records the trials.

`run_search` starts a study and `resume_search` continues one after Ctrl-C, a killed driver or
a lost cluster, from the settings saved beside Tune's own state (`search.settings`). The Optuna
study is part of Tune's searcher state (`search.searcher`); MLflow holds one parent run per
search and one child run per trial (`search.tracking`, `search.trial`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune import ExperimentAnalysis, Tuner
from ray.tune.search import BasicVariantGenerator

from search import tracking
from search.checks import check_encoder_weights, check_new_search, check_storage, partial_fixed
from search.progress import ProgressPrinter, stopped_early
from search.ray_session import ray_session, with_gpu_share
from search.scheduler import ASHAState, asha
from search.searcher import TRIAL_NUMBER, PruningAwareOptunaSearch, tpe_sampler
from search.settings import DEFAULTS, SearchSettings, load_settings
from search.storage import is_uri, remove
from search.trial import OUTAGE_FILE, TrialRunCloser, TrialSetup, tracking_outage, trial_fn
from spaces import PAPER_POINTS, get_space
from trainable import pretrained
from trainable.config import TrialConfig
from trainable.data.cache import data_origin


@dataclass(frozen=True)
class SearchSummary:
    """How a search (or its latest resumption) ended."""

    name: str
    path: str
    completed: int  # ran the whole budget
    pruned: int  # stopped early by ASHA
    failed: int  # failed after all retries
    interrupted: bool  # stopped before every trial ended: `gazetune resume` continues
    best: dict | None  # trial_id, run_id, config, the selection metric, epoch and val/* metrics
    # of the best epoch


def run_search(settings: SearchSettings, trainable: Callable | None = None,
               workdir: Path | None = None) -> SearchSummary:
    """Run a new search until `settings.samples` trials have ended.

    Args:
        settings: the search's options; relative paths are taken from `workdir`.
        trainable: `(config, setup)` run by Ray per trial; `search.trial.trial_fn` unless given
            (tests wrap it to inject faults).
        workdir: where relative paths and the embedded MLflow store live (default: cwd).
    """
    settings = settings.resolved(Path(workdir or Path.cwd()))
    settings = with_default_weights(settings)
    check_new_search(settings)
    experiment_id = tracking.ensure_experiment(settings.name, settings.tracking_uri)
    with ray_session(settings.address):
        settings = with_gpu_share(settings)
        parent_run_id = tracking.start_parent_run(experiment_id, settings.params(),
                                                  settings.tracking_uri)
        settings = dataclasses.replace(settings, experiment_id=experiment_id,
                                       parent_run_id=parent_run_id)
        settings.save()
        _print_start(settings, resumed=False)
        grid = _fit(settings, _new_tuner(settings, trainable))
    return _finish(settings, grid)


def resume_search(name: str, storage: str = DEFAULTS.storage,
                  tracking_uri: str | None = None, address: str | None = None,
                  trainable: Callable | None = None,
                  workdir: Path | None = None) -> SearchSummary:
    """Continue an interrupted search to its full number of trials.

    Unfinished trials continue from their last checkpoint (also those that had failed), the
    searcher suggests the remaining ones, and each trial's MLflow run goes on where it was.
    `tracking_uri` and `address` replace the saved ones (a moved server, another cluster).
    """
    workdir = Path(workdir or Path.cwd())
    settings = load_settings(name, storage, workdir)
    settings = dataclasses.replace(
        settings,
        tracking_uri=(tracking.resolve_tracking_uri(tracking_uri, workdir) if tracking_uri
                      else settings.tracking_uri),
        address=address or settings.address,
    )
    check_storage(settings)
    check_encoder_weights(settings)
    settings.save()
    with ray_session(settings.address):
        tracking.start_parent_run(settings.experiment_id, settings.params(),
                                  settings.tracking_uri, run_id=settings.parent_run_id)
        _print_start(settings, resumed=True)
        if Tuner.can_restore(settings.path):
            _close_lost_runs(settings)
            tuner = Tuner.restore(settings.path, trainable=_trainable(settings, trainable),
                                  resume_unfinished=True, resume_errored=True)
        else:  # stopped before Tune saved anything: start it as it would have started
            tuner = _new_tuner(settings, trainable)
        grid = _fit(settings, tuner)
    return _finish(settings, grid)


def with_default_weights(settings: SearchSettings) -> SearchSettings:
    """`encoder_weights` fixed to its default for the cache (`trainable.pretrained.
    with_default_weights`: imagenet for the real release) unless `--set` gives it. Fixed, so
    that it is saved with the settings (a resume trains alike) and every trial's params show
    it."""
    encoder = settings.fixed.get("encoder", TrialConfig.encoder)
    return dataclasses.replace(settings, fixed=pretrained.with_default_weights(
        settings.fixed, data_origin(settings.cache), encoder))


def _close_lost_runs(settings: SearchSettings) -> None:
    """End the RUNNING runs of trials the resumed search will not continue.

    Tune snapshots its state every `TUNE_GLOBAL_CHECKPOINT_S`; a trial started just before the
    driver died can have opened its MLflow run without being in the last snapshot: FAILED,
    with the reason. A trial Tune had ended while the tracking store was unreachable kept its
    run open: FINISHED (tagged when pruned), as the driver would have ended it.
    """
    known = {trial.trial_id: trial for trial in ExperimentAnalysis(settings.path).trials}
    for run in tracking.find_trial_runs(settings.tracking_uri, settings.name):
        trial_id = run.data.tags.get(tracking.TRIAL_TAG)
        if (run.info.status != "RUNNING"
                or run.data.tags.get(tracking.PARENT_TAG) != settings.parent_run_id):
            continue
        trial = known.get(trial_id)
        if trial is None:
            tracking.finish_trial_run(
                settings.tracking_uri, settings.experiment_id, trial_id, "FAILED",
                failure="lost: the search stopped before Tune saved this trial, and the "
                        "resumed search suggests a new one instead")
        elif trial.status == "TERMINATED":
            tracking.finish_trial_run(settings.tracking_uri, settings.experiment_id, trial_id,
                                      "FINISHED",
                                      pruned=stopped_early(trial, settings.max_epochs))


def _new_tuner(settings: SearchSettings, trainable: Callable | None):
    param_space = None
    if settings.points:
        # Given configs, nothing to suggest: Ray's variant generator runs them in order, each
        # numbered by its place (the runs' names and `gazetune repeat`'s grouping use it).
        # Tune accepts a preset point only for keys of the space, so the space is each key's
        # values in the points (which share their keys); every sample is a point, so it is
        # never sampled from.
        points = [{**p, TRIAL_NUMBER: i} for i, p in enumerate(settings.points)]
        searcher = BasicVariantGenerator(points_to_evaluate=points)
        param_space = {key: tune.choice(list(dict.fromkeys(p[key] for p in points)))
                       for key in points[0]}
    else:
        searcher, points = _optuna_searcher(settings)
    # The points run their whole budget: ASHA judges only the sampled trials.
    scheduler = asha(settings.max_epochs, settings.grace_period, settings.reduction_factor,
                     paper_points=len(points))
    return tune.Tuner(
        _trainable(settings, trainable),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=settings.metric, mode="max", search_alg=searcher,
                                    scheduler=scheduler, num_samples=settings.samples,
                                    max_concurrent_trials=settings.max_concurrent),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=settings.storage,
            # Each checkpoint holds the state to continue from and, in best/, the best epoch.
            # Two, not one: Tune deletes the older as soon as a newer one is saved, and its
            # state snapshot may still name the older when the driver is killed (measured:
            # with one, the resumed trial failed for want of its checkpoint).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            # In this order for good: Tune restores callbacks' states by position.
            callbacks=[ASHAState(scheduler), TrialRunCloser(),
                       ProgressPrinter(settings.samples, settings.max_epochs,
                                       settings.metric)],
            verbose=0,  # ProgressPrinter says what a person needs
        ),
    )


def _optuna_searcher(settings: SearchSettings) -> tuple[PruningAwareOptunaSearch, list]:
    """TPE over the settings' space, the paper's points queued first when asked; and those."""
    sampler = tpe_sampler(settings.seed)
    # Optuna queues each point as a waiting trial: no more than the search will run.
    points = [dict(p) for p in PAPER_POINTS[:settings.samples]] if settings.paper_points else []
    if settings.fixed:
        # A fixed setting that the space searches is fixed in Optuna too, so the study
        # records what the trial really used (`--set loss_set=set3` narrows the search).
        sampler = partial_fixed(settings.fixed, sampler)
    searcher = PruningAwareOptunaSearch(
        space=get_space(settings.space), metric=settings.metric, mode="max", sampler=sampler,
        study_name=settings.name, max_t=settings.max_epochs,
        points_to_evaluate=points or None,
    )
    return searcher, points


def _fit(settings: SearchSettings, tuner):
    remove(f"{settings.path}/{OUTAGE_FILE}")  # a previous outage, now resumed
    grid = tuner.fit()
    if outage := tracking_outage(settings):
        # Stopped by TrialRunCloser; the parent run stays RUNNING until the resumed search
        # ends it (asking the store again would only wait out another retry budget).
        raise tracking.TrackingError(
            f"{outage}; the search stopped, and `gazetune resume {settings.name}` continues "
            f"it once the tracking store is reachable")
    return grid


def _trainable(settings: SearchSettings, trainable: Callable | None):
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial or 0}
    return tune.with_resources(
        tune.with_parameters(trainable or trial_fn, setup=TrialSetup.of(settings)), resources)


def _finish(settings: SearchSettings, grid) -> SearchSummary:
    """Count how the trials ended; when all have, record the best one on the parent run."""
    ended = [r for r in grid if r.error is not None or r.metrics.get("done")]
    failed = sum(r.error is not None for r in ended)
    pruned = sum(r.error is None and r.metrics["training_iteration"] < settings.max_epochs
                 for r in ended)
    interrupted = len(ended) < settings.samples
    best = None
    # A failed trial (diverged, out of memory, crashed past max_failures) is never the best:
    # `gazetune export` ranks finished runs only, and the summary must agree with it.
    # A validation AUC can be undefined (NaN) at every epoch; such a trial is never the best.
    scored = [r for r in grid if r.error is None and settings.metric in r.metrics
              and math.isfinite(_peak(r, settings.metric))]
    if scored:
        best = _best_trial(settings, scored)
    # The parent run ends in every case (a resume reopens it): KILLED shows an interrupted
    # search in the MLflow UI as stopped rather than running forever.
    if interrupted:
        tracking.end_parent_run(settings.parent_run_id, "KILLED", settings.tracking_uri)
    elif best is not None:
        tracking.log_parent_result(settings.parent_run_id, best, settings.tracking_uri)
    else:  # every trial failed
        tracking.end_parent_run(settings.parent_run_id, "FAILED", settings.tracking_uri)
    return SearchSummary(settings.name, settings.path, len(ended) - failed - pruned, pruned,
                         failed, interrupted, best)


def _best_trial(settings: SearchSettings, results: list) -> dict:
    """The trial with the best validation epoch: its run, full config and that epoch's metrics."""
    result = max(results, key=lambda r: _peak(r, settings.metric))
    history = result.metrics_dataframe
    epoch = history.loc[history[settings.metric].astype(float).idxmax(skipna=True)]
    trial_id = result.metrics["trial_id"]
    run_ids = {run.data.tags.get(tracking.TRIAL_TAG): run.info.run_id
               for run in tracking.find_trial_runs(settings.tracking_uri, settings.name)}
    config = TrialConfig.from_dict(
        TrialSetup.of(settings).trial_config(result.config, Path("."))).to_dict()
    del config["checkpoint_dir"]  # the trial's scratch folder; the checkpoint is in its run
    return {"trial_id": trial_id, "run_id": run_ids.get(trial_id), "config": config,
            "metric": settings.metric, "epoch": int(epoch["training_iteration"]),
            "metrics": {k: float(v) for k, v in epoch.items() if k.startswith("val/")}}


def _peak(result, metric: str) -> float:
    """A trial's best finite validation score; -inf when it has none."""
    values = result.metrics_dataframe[metric]
    values = values[values.map(math.isfinite)]
    return float(values.max()) if len(values) else -math.inf


def _print_start(settings: SearchSettings, resumed: bool) -> None:
    verb = "resuming" if resumed else "starting"
    print(f"{verb} search {settings.name!r}: space {settings.space}, {settings.samples} trials, "
          f"up to {settings.max_epochs} epochs each, {settings.cpus_per_trial:g} CPU + "
          f"{settings.gpus_per_trial or 0:g} GPU per trial\n"
          f"  Tune state: {settings.path}\n  MLflow: {settings.tracking_uri} "
          f"(experiment {settings.name!r})", flush=True)
    if settings.address and not is_uri(settings.storage):
        print(f"  on a cluster, {settings.storage} must be a folder every node mounts "
              f"(or pass --storage s3://...)", flush=True)
