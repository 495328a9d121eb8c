"""The search service: Ray Tune runs Optuna's suggestions under ASHA, MLflow records the trials.

`run_search` starts a study and `resume_search` continues one after Ctrl-C, a killed driver or
a lost cluster. Everything needed to resume is saved beside Tune's own state, in
`<storage>/<name>/gazetune.json`, so `gazetune resume NAME` needs no other option. The Optuna
study is part of Tune's searcher state (see `search.searcher`); MLflow holds one parent run per
search and one child run per trial (see `search.tracking`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import ray
from optuna.samplers import PartialFixedSampler, RandomSampler
from ray import tune
from ray.tune import Callback, ExperimentAnalysis, Tuner
from ray.tune.schedulers import ASHAScheduler

from search import packing, tracking
from search.names import check_name
from search.searcher import PruningAwareOptunaSearch, tpe_sampler
from search.trial import (
    SETTINGS_ENV,
    TrialRunCloser,
    TrialSetup,
    failure_reason,
    stopped_early,
    tracking_outage,
    trial_fn,
)
from spaces import PAPER_POINTS, get_space, sample
from trainable.config import ConfigError, TrialConfig
from trainable.errors import GazetuneError

METRIC = "val/auc/mean"  # what ASHA and Optuna maximise (trainable.loop.METRIC)
SETTINGS_FILE = "gazetune.json"
# Set by the service itself, each from its own option.
RESERVED_KEYS = {"cache": "--cache", "epochs": "--max-epochs",
                 "gpu_memory_fraction": "--gpus-per-trial", "checkpoint_dir": None}


@dataclass(frozen=True)
class SearchSettings:
    """A search's options: what `gazetune search` was given, resolved to absolute locations."""

    name: str
    space: str = "paper"
    samples: int = 16
    max_epochs: int = 20
    grace_period: int = 2
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 0.25 when the cluster has GPUs, else 0
    max_concurrent: int | None = None  # None: as many as the resources allow
    seed: int = 0
    paper_points: bool = False
    fixed: dict = field(default_factory=dict)  # trial settings, typed (`--set KEY=VALUE`)
    max_failures: int = 2
    address: str | None = None  # a Ray cluster; None starts a local one
    storage: str = "ray_results"  # Tune's storage: an absolute path or a URI
    cache: str = "cache"
    tracking_uri: str | None = None
    experiment_id: str | None = None  # filled in when the search starts
    parent_run_id: str | None = None

    @property
    def path(self) -> str:
        """The experiment's folder (or URI) in Tune's storage."""
        return f"{self.storage.rstrip('/')}/{self.name}"

    def resolved(self, workdir: Path) -> "SearchSettings":
        """Absolute paths and URIs: Ray runs each trial in its own directory."""
        return dataclasses.replace(
            self,
            storage=self.storage if _is_uri(self.storage) else str(_absolute(self.storage,
                                                                             workdir)),
            cache=str(_absolute(self.cache, workdir)),
            tracking_uri=tracking.resolve_tracking_uri(self.tracking_uri, workdir),
        )

    def save(self) -> None:
        """Write `<storage>/<name>/gazetune.json` in one step (a killed driver leaves the old)."""
        _write_text(f"{self.path}/{SETTINGS_FILE}",
                    json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str) -> "SearchSettings":
        """Read a settings file (`path` may also be the experiment folder)."""
        if not str(path).endswith(".json"):
            path = f"{str(path).rstrip('/')}/{SETTINGS_FILE}"
        try:
            return cls(**json.loads(_read_text(path)))
        except FileNotFoundError:
            raise GazetuneError(f"no search settings at {path}: not a gazetune search, or "
                                f"another --storage") from None
        except (TypeError, ValueError) as err:
            raise GazetuneError(f"search settings {path} cannot be read: {err}") from None
        except OSError as err:  # e.g. --storage under a regular file
            raise GazetuneError(f"search settings {path} cannot be read: "
                                f"{err.strerror or err}") from None


@dataclass(frozen=True)
class SearchSummary:
    """How a search (or its latest resumption) ended."""

    name: str
    path: str
    completed: int  # ran the whole budget
    pruned: int  # stopped early by ASHA
    failed: int  # failed after all retries
    interrupted: bool  # stopped before every trial ended: `gazetune resume` continues
    best: dict | None  # trial_id, run_id, config, epoch and val/* metrics of the best epoch


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
    _check(settings)
    experiment_id = tracking.ensure_experiment(settings.name, settings.tracking_uri)
    with _ray(settings.address):
        settings = _with_gpus(settings)
        parent_run_id = tracking.start_parent_run(experiment_id, _params(settings),
                                                  settings.tracking_uri)
        settings = dataclasses.replace(settings, experiment_id=experiment_id,
                                       parent_run_id=parent_run_id)
        settings.save()
        _print_start(settings, resumed=False)
        grid = _fit(settings, _new_tuner(settings, trainable))
    return _finish(settings, grid)


def resume_search(name: str, storage: str = "ray_results", tracking_uri: str | None = None,
                  address: str | None = None, trainable: Callable | None = None,
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
    _check_storage(settings)
    settings.save()
    with _ray(settings.address):
        tracking.start_parent_run(settings.experiment_id, _params(settings),
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


def parse_fixed(items: list[str]) -> dict:
    """`--set KEY=VALUE` items as typed trial settings; unknown keys and bad values refused."""
    raw = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        if key in RESERVED_KEYS:
            option = RESERVED_KEYS[key]
            raise ConfigError(f"--set {key}: the search sets {key!r} itself"
                              + (f"; use {option}" if option else ""))
        raw[key] = value
    cfg = TrialConfig.from_dict(raw)
    return {key: getattr(cfg, key) for key in raw}


def load_settings(name: str, storage: str = "ray_results",
                  workdir: Path | None = None) -> SearchSettings:
    """The saved settings of search `name`, its storage as given now (the folder may move)."""
    workdir = Path(workdir or Path.cwd())
    check_name(name)
    storage = storage if _is_uri(storage) else str(_absolute(storage, workdir))
    settings = SearchSettings.load(f"{storage.rstrip('/')}/{name}")
    return dataclasses.replace(settings, storage=storage)


# ---------------------------------------------------------------------------------------------
# Tune


def _new_tuner(settings: SearchSettings, trainable: Callable | None):
    sampler = tpe_sampler(settings.seed)
    if settings.fixed:
        # A fixed setting that the space searches is fixed in Optuna too, so the study
        # records what the trial really used (`--set loss_set=set3` narrows the search).
        sampler = _partial_fixed(settings.fixed, sampler)
    searcher = PruningAwareOptunaSearch(
        space=get_space(settings.space), metric=METRIC, mode="max", sampler=sampler,
        study_name=settings.name, max_t=settings.max_epochs,
        # Optuna queues each point as a waiting trial: no more than the search will run.
        points_to_evaluate=([dict(p) for p in PAPER_POINTS[:settings.samples]]
                            if settings.paper_points else None),
    )
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=settings.max_epochs,
                              grace_period=settings.grace_period,
                              reduction_factor=settings.reduction_factor)
    return tune.Tuner(
        _trainable(settings, trainable),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher,
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
            callbacks=_callbacks(settings),
            verbose=0,  # ProgressPrinter says what a person needs
        ),
    )


def _fit(settings: SearchSettings, tuner):
    os.environ[SETTINGS_ENV] = f"{settings.path}/{SETTINGS_FILE}"  # for TrialRunCloser
    grid = tuner.fit()
    if outage := tracking_outage():
        # Stopped by TrialRunCloser; the parent run stays RUNNING until the resumed search
        # ends it (asking the store again would only wait out another retry budget).
        raise tracking.TrackingError(
            f"{outage}; the search stopped, and `gazetune resume {settings.name}` continues "
            f"it once the tracking store is reachable")
    return grid


def _trainable(settings: SearchSettings, trainable: Callable | None):
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial or 0}
    return tune.with_resources(
        tune.with_parameters(trainable or trial_fn, setup=_trial_setup(settings)), resources)


def _trial_setup(settings: SearchSettings) -> TrialSetup:
    return TrialSetup(
        cache=settings.cache, epochs=settings.max_epochs, tracking_uri=settings.tracking_uri,
        experiment_id=settings.experiment_id, parent_run_id=settings.parent_run_id,
        fixed=settings.fixed, threads=max(1, int(settings.cpus_per_trial)),
        gpu_fraction=settings.gpus_per_trial or 0.0,
        credentials=tracking.credentials_from_env(),
    )


def _callbacks(settings: SearchSettings) -> list:
    return [TrialRunCloser(), ProgressPrinter(settings.samples, settings.max_epochs)]


@contextmanager
def _ray(address: str | None):
    """A Ray session: the given cluster, or a new local one (never someone else's `ray start`)."""
    # Tune reports a harmless warning whenever checkpoints force frequent state snapshots,
    # and its default console output repeats what ProgressPrinter says (legacy + verbose=0:
    # nothing).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Snapshot Tune's state every second (default: every 10 s or more): a new trial is then
    # saved before it has started a process and opened its MLflow run, so a killed driver
    # leaves no run that the resumed search does not know.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # A failed trial is one line of ProgressPrinter (its error, in full, is in the trial's
    # error.txt in Tune's storage); Tune's default adds the whole remote traceback each time.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    if address and "RAY_AUTH_MODE" not in os.environ and _have_ray_token():
        # Ray sends its token only to clusters it starts itself or finds with "auto"; a
        # cluster started with token authentication (cluster.yaml) refuses a driver without it.
        os.environ["RAY_AUTH_MODE"] = "token"
    if address:
        ray.init(address=address)
    else:
        # A new local cluster (Ray turns token authentication on for it by default), without
        # the dashboard and without the Prometheus metrics endpoints an unconfigured Ray opens
        # on 0.0.0.0. What remains cannot be confined to 127.0.0.1 in Ray 2.60: its gRPC
        # servers (GCS, raylet, workers, this driver) bind every interface, and it maps a node
        # address of 127.0.0.1 to the machine's own (`resolve_ip_for_localhost`), where its
        # runtime-env and dashboard agents serve HTTP; the token guards the gRPC servers. The
        # autoscaler monitor and the dashboard head still serve Prometheus metrics on 0.0.0.0
        # (ports 44217, 44227): Ray binds them to loopback only for a loopback head address.
        os.environ.setdefault("RAY_enable_metrics_collection", "0")
        ray.init(address="local", include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _have_ray_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def _with_gpus(settings: SearchSettings) -> SearchSettings:
    """Resolve `gpus_per_trial=None`: as many trials per GPU as fit the smallest GPU of the
    cluster at the cache's image size and the trials' batch size (`search.packing`), up to
    four; 0 on a cluster without GPUs."""
    if settings.gpus_per_trial is not None:
        return settings
    gpu_gib = packing.smallest_gpu_memory_gib(ray.nodes())
    if gpu_gib is None:
        return dataclasses.replace(settings, gpus_per_trial=0.0)
    batch = settings.fixed.get("batch_size", TrialConfig.batch_size)
    share = packing.default_gpu_share(_image_size(settings.cache), batch, gpu_gib)
    return dataclasses.replace(settings, gpus_per_trial=share)


def _image_size(cache: str) -> int:
    """The image size of a prepared cache, from its manifest; 224 (the paper's) for a cache
    this machine cannot read (a URI: the trials read it, not the driver)."""
    from trainable.data.cache import MANIFEST

    if _is_uri(cache):
        return 224
    return int(json.loads((Path(cache) / MANIFEST).read_text())["params"]["size"])


# ---------------------------------------------------------------------------------------------
# Checks, results, progress


def _check(settings: SearchSettings) -> None:
    """Refuse a search that cannot work before anything starts (a message naming the cause)."""
    check_name(settings.name, "--name")
    try:
        space = get_space(settings.space)
    except KeyError as err:
        raise ConfigError(f"--space: {err.args[0]}") from None
    for option, low, high in (("samples", 1, 100_000), ("max_epochs", 1, 10_000),
                              ("grace_period", 1, 10_000), ("reduction_factor", 2, 100),
                              ("cpus_per_trial", 0.01, 1024), ("gpus_per_trial", 0, 64),
                              ("max_concurrent", 1, 10_000), ("max_failures", 0, 100),
                              ("seed", 0, 2**32 - 1)):
        value = getattr(settings, option)
        if value is None and option in ("gpus_per_trial", "max_concurrent"):
            continue  # chosen from the cluster
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not low <= value <= high:  # NaN fails too
            raise ConfigError(f"--{option.replace('_', '-')} must be in [{low:g}, {high:g}], "
                              f"got {value!r}")
    if settings.grace_period > settings.max_epochs:
        raise ConfigError(f"--grace-period {settings.grace_period} exceeds --max-epochs "
                          f"{settings.max_epochs}")
    _check_fixed(space, settings)
    if not _is_uri(settings.cache) and not Path(settings.cache).is_dir():
        raise GazetuneError(f"cache {settings.cache} does not exist: run `gazetune prepare` "
                            f"first or pass --cache")
    if _exists(f"{settings.path}/{SETTINGS_FILE}") or _can_restore(settings.path):
        raise GazetuneError(f"a search named {settings.name!r} already exists at "
                            f"{settings.path}: `gazetune resume {settings.name}` continues it, "
                            f"or choose another --name")
    if not _is_uri(settings.cache):  # a cache on a URI is read by the trials, not here
        from trainable.data.cache import check_splits

        check_splits(settings.cache)
    _check_storage(settings)  # last: it creates the storage folder


def _check_storage(settings: SearchSettings) -> None:
    """Refuse local folders the search cannot write (Tune's storage, the embedded MLflow store)
    before Ray starts, rather than when the first trial reports."""
    from trainable.checkpoint import check_writable

    if not _is_uri(settings.storage):
        check_writable(settings.storage, "search storage (--storage)")
    tracking.check_store_writable(settings.tracking_uri)


def _check_fixed(space: Callable, settings: SearchSettings) -> None:
    """Fixed settings must form a valid trial config with whatever the space samples."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=_partial_fixed(settings.fixed, RandomSampler(0)))
    for _ in range(50):  # enough draws to reach every branch of the spaces here
        try:
            sampled = sample(space, study.ask())
        except ValueError as err:  # a fixed value outside the space's choices
            raise ConfigError(f"--set {settings.fixed}: not in space {settings.space!r}: "
                              f"{err}") from None
        TrialConfig.from_dict({**settings.fixed, **sampled, "cache": settings.cache,
                               "epochs": settings.max_epochs})


def _partial_fixed(fixed: dict, sampler) -> PartialFixedSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return PartialFixedSampler(fixed, sampler)


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
    scored = [r for r in grid if r.error is None and METRIC in r.metrics
              and math.isfinite(_peak(r))]
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
    result = max(results, key=_peak)
    history = result.metrics_dataframe
    epoch = history.loc[history[METRIC].astype(float).idxmax(skipna=True)]
    trial_id = result.metrics["trial_id"]
    run_ids = {run.data.tags.get(tracking.TRIAL_TAG): run.info.run_id
               for run in tracking.find_trial_runs(settings.tracking_uri, settings.name)}
    config = TrialConfig.from_dict(
        _trial_setup(settings).trial_config(result.config, Path("."))).to_dict()
    del config["checkpoint_dir"]  # the trial's scratch folder; the checkpoint is in its run
    return {"trial_id": trial_id, "run_id": run_ids.get(trial_id), "config": config,
            "epoch": int(epoch["training_iteration"]),
            "metrics": {k: float(v) for k, v in epoch.items() if k.startswith("val/")}}


def _peak(result) -> float:
    """A trial's best finite validation score; -inf when it has none."""
    values = result.metrics_dataframe[METRIC]
    values = values[values.map(math.isfinite)]
    return float(values.max()) if len(values) else -math.inf


def _params(settings: SearchSettings) -> dict:
    """The parent run's params: the options a person compares searches by."""
    skip = {"experiment_id", "parent_run_id", "tracking_uri"}
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in skip}


def _print_start(settings: SearchSettings, resumed: bool) -> None:
    verb = "resuming" if resumed else "starting"
    print(f"{verb} search {settings.name!r}: space {settings.space}, {settings.samples} trials, "
          f"up to {settings.max_epochs} epochs each, {settings.cpus_per_trial:g} CPU + "
          f"{settings.gpus_per_trial or 0:g} GPU per trial\n"
          f"  Tune state: {settings.path}\n  MLflow: {settings.tracking_uri} "
          f"(experiment {settings.name!r})", flush=True)
    if settings.address and not _is_uri(settings.storage):
        print(f"  on a cluster, {settings.storage} must be a folder every node mounts "
              f"(or pass --storage s3://...)", flush=True)


def describe(config: dict) -> str:
    """A trial's sampled configuration in one short line."""
    method = config.get("loss_set", "?")
    if config.get("generator") and method in ("set1", "set2", "set3"):
        method += f"/{config['generator']}"
    rest = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in config.items() if k not in ("loss_set", "generator"))
    return f"{method} {rest}".strip()


def _best_value(trial) -> float | None:
    value = (trial.metric_analysis.get(METRIC) or {}).get("max")
    return None if value is None or value != value else value  # NaN: no score


class ProgressPrinter(Callback):
    """Console progress a person can follow: a line per trial event, a summary every minute."""

    def __init__(self, total: int, max_t: int, every_s: float = 60.0):
        self.total, self.max_t, self.every_s = total, max_t, every_s
        self._last = 0.0

    def setup(self, **info) -> None:
        self._last = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        _say(f"trial {trial.trial_id} started: {describe(trial.config)}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        _say(f"trial {trial.trial_id} failed, retrying from its last checkpoint: "
             f"{failure_reason(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        how = "pruned" if stopped_early(trial, self.max_t) else "finished"
        best = _best_value(trial)
        score = f", best {METRIC} {best:.3f}" if best is not None else ""
        _say(f"trial {trial.trial_id} {how} after {epochs} epoch(s){score}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        _say(f"trial {trial.trial_id} FAILED: {failure_reason(trial)}")

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            _say(self.summary(trials))

    def on_experiment_end(self, trials, **info) -> None:
        _say(self.summary(trials))

    def summary(self, trials) -> str:
        status = [t.status for t in trials]
        ended = [t for t in trials if t.status == "TERMINATED"]
        pruned = sum(stopped_early(t, self.max_t) for t in ended)
        line = (f"{len(ended)}/{self.total} trials done ({pruned} pruned), "
                f"{status.count('ERROR')} failed, {status.count('RUNNING')} running")
        scored = [(v, t) for t in trials
                  if t.status != "ERROR" and (v := _best_value(t)) is not None]
        if scored:
            value, trial = max(scored, key=lambda pair: pair[0])
            line += f"; best {METRIC} {value:.3f} (trial {trial.trial_id}: " \
                    f"{describe(trial.config)})"
        return line


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# ---------------------------------------------------------------------------------------------
# Files in Tune's storage: a local folder or a URI (s3://, gs://, ...)


def _is_uri(location: str) -> bool:
    return "://" in str(location)


def _absolute(path: str | Path, workdir: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (workdir / path).absolute()


def _write_text(location: str, text: str) -> None:
    if _is_uri(location):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        with fs.open_output_stream(path) as out:  # one object written at once
            out.write(text.encode())
        return
    from trainable.checkpoint import atomic_write

    atomic_write(Path(location), lambda tmp: tmp.write_text(text))


def _read_text(location: str) -> str:
    if _is_uri(location):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(location)
        with fs.open_input_stream(path) as src:
            return src.readall().decode()
    return Path(location).read_text()


def _can_restore(path: str) -> bool:
    try:
        return Tuner.can_restore(path)
    except (NotADirectoryError, PermissionError):  # refused with its reason by _check_storage
        return False


def _exists(location: str) -> bool:
    try:
        _read_text(location)
    except (FileNotFoundError, NotADirectoryError):  # e.g. a storage path under a file
        return False
    return True
