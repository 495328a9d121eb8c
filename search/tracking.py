"""MLflow tracking of searches and trials: the only module that talks to MLflow.

One experiment per study, one parent run per search, exactly one child run per trial (found
again by its tag `ray.trial_id` after a retry or a resume).
Every call goes through `MlflowClient` with explicit run ids: the driver, the parent and the
trials' runs interleave, so MLflow's global "active run" would mix them up.

A tracking server may be down for a while in the middle of a search. Every call from a trial
goes through `_retry` (exponential backoff, at most `GAZETUNE_MLFLOW_RETRY_S` seconds of
waiting, 300 by default), and a trial keeps the metrics it could not send and sends them with
its next call, so an outage costs time but no metric. A server that does not come back within
that budget fails the trial with a `TrackingError` naming the tracking URI.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from functools import cache, partial
from pathlib import Path
from typing import TypeVar

from trainable.config import matters
from trainable.errors import GazetuneError
from trainable.loss_sets import LOSS_SETS

log = logging.getLogger(__name__)

TRIAL_TAG = "ray.trial_id"
PARENT_TAG = "mlflow.parentRunId"
NUMBER_TAG = "trial_number"  # the trial's number in the study (Optuna's), also in its name
VERSION_TAG = "gazetune.version"
RETRY_ENV = "GAZETUNE_MLFLOW_RETRY_S"
DEFAULT_RETRY_S = 300.0
# MLflow's own HTTP retries (urllib3, up to minutes of backoff per call) would hide the outage
# from our budget; with these defaults a call to a dead server fails within seconds and `_retry`
# decides. A user's explicit setting wins.
CLIENT_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
BATCH = 1000  # MLflow's limit of metrics in one log_batch request
PARAMS_BATCH = 100  # ... and of params

T = TypeVar("T")


class TrackingError(GazetuneError):
    """The tracking store refused a call or stayed unreachable for the whole retry budget."""


# ---------------------------------------------------------------------------------------------
# Stores and experiments


def resolve_tracking_uri(uri: str | None, workdir: Path) -> str:
    """The tracking URI a search passes to its trials: always absolute.

    Trials run in their own directories, so a relative SQLite path would create one database
    per trial. `None` gives the embedded default `sqlite:///<workdir>/mlflow.db`.
    """
    workdir = Path(workdir).absolute()
    if uri is None:
        return f"sqlite:///{workdir / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path if path.is_absolute() else workdir / path}"
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses new file stores with a message that does not say what to use instead.
        raise TrackingError(
            f"tracking URI {uri!r}: use http(s)://HOST:PORT for a tracking server or "
            f"sqlite:///PATH.db for a local store (MLflow no longer accepts file stores)"
        )
    return uri


# MLflow's client reads these; a server with the basic-auth app (cluster.yaml) needs them.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def credentials_from_env() -> dict[str, str]:
    """The tracking server's credentials in this process's environment, to hand to trials
    (Ray starts workers with the node's environment, not the driver's)."""
    return {key: os.environ[key] for key in CREDENTIAL_ENV if os.environ.get(key)}


def check_store_writable(uri: str) -> None:
    """Refuse an embedded SQLite store whose folder cannot be written, at once rather than
    after the retries of a failing store (a server's URI is not checked here)."""
    if uri.startswith("sqlite:///"):
        from trainable.files import check_writable

        check_writable(Path(uri.removeprefix("sqlite:///")).parent,
                       "MLflow store folder (the working directory unless --tracking-uri)")


def existing_store(uri: str) -> str:
    """`uri` itself, if it can hold a study: reading commands must not create an empty store.

    Raises:
        TrackingError: a SQLite store that does not exist.
    """
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}, so no study here: run this "
            f"command in the folder where `gazetune search` ran, or pass --tracking-uri")
    return uri


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The id of the study's experiment, created on first use.

    With a SQLite store the artifacts go to `mlartifacts/` beside the database (an absolute
    file URI; MLflow's default `./mlruns` would follow each trial's working directory); a
    tracking server keeps its own artifact location.
    """
    from mlflow.entities import LifecycleStage
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    found = _retry(lambda: client.get_experiment_by_name(name), "looking up the experiment",
                   tracking_uri)
    if found is not None:
        if found.lifecycle_stage == LifecycleStage.DELETED:
            _retry(lambda: client.restore_experiment(found.experiment_id),
                   "restoring the experiment", tracking_uri)
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        location = (db.parent / "mlartifacts").as_uri()
    try:
        return _retry(lambda: client.create_experiment(name, artifact_location=location),
                      "creating the experiment", tracking_uri)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Another process of the same study created it between our lookup and our create.
        return client.get_experiment_by_name(name).experiment_id


# ---------------------------------------------------------------------------------------------
# The parent run (one per search, driven from the Ray driver)


def start_parent_run(experiment_id: str, settings: Mapping, tracking_uri: str,
                     run_id: str | None = None) -> str:
    """Create the search's parent run, or reopen `run_id` when the search resumes.

    `settings` (the search's options, nested dicts allowed) become params with dotted keys;
    on resume only settings not logged before are added, since MLflow refuses to change a param.
    """
    client = _client(tracking_uri)
    tags = {"gazetune.role": "search", **run_tags()}
    if "name" in settings:
        tags["mlflow.runName"] = str(settings["name"])
    if run_id is None:
        run_id = _retry(lambda: client.create_run(experiment_id, tags=tags).info.run_id,
                        "creating the search's parent run", tracking_uri)
    else:
        _retry(lambda: client.update_run(run_id, status="RUNNING"),
               "reopening the search's parent run", tracking_uri)
    _log_new_params(client, run_id, flatten(settings), tracking_uri)
    return run_id


def log_parent_result(parent_run_id: str, best: Mapping, tracking_uri: str) -> None:
    """Record the best trial on the parent run and end the run FINISHED.

    Args:
        best: `run_id` (the best trial's child run), `config` (its trial config) and its
            validation AUCs, either as `val` = {name: [auc, lo, hi]} (the report format) or as
            `metrics` = {"val/auc/<name>[/lo|/hi]": value} (the epoch report format), and
            optionally `trial_id` and `epoch`. Logged as tags `best_run_id` (`best_trial_id`,
            `best_epoch`), params `best.<key>` and metrics `best/val/auc/...`.
    """
    from mlflow.entities import Metric, RunTag

    client = _client(tracking_uri)
    now = _now_ms()
    metrics = {f"best/{k}": float(v) for k, v in (best.get("metrics") or {}).items()
               if k.startswith("val/auc/")}
    for name, (auc, lo, hi) in (best.get("val") or {}).items():
        metrics.update({f"best/val/auc/{name}": auc, f"best/val/auc/{name}/lo": lo,
                        f"best/val/auc/{name}/hi": hi})
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    _retry(lambda: client.log_batch(parent_run_id, metrics=batch), "logging the best trial",
           tracking_uri)
    tags = [RunTag(f"best_{key}", str(best[key])) for key in ("run_id", "trial_id", "epoch")
            if best.get(key) is not None]
    _retry(lambda: client.log_batch(parent_run_id, tags=tags), "tagging the best trial",
           tracking_uri)
    # A resumed search can end with another best trial than a previous attempt recorded; params
    # cannot change, so the full best config also goes to an artifact that can be replaced.
    config = dict(best.get("config") or {})
    _log_new_params(client, parent_run_id, flatten(config, prefix="best."), tracking_uri)
    _retry(lambda: client.log_dict(parent_run_id, {"run_id": best.get("run_id"), **config},
                                   "best_config.json"),
           "logging the best config", tracking_uri)
    _retry(lambda: client.set_terminated(parent_run_id, "FINISHED"),
           "ending the search's parent run", tracking_uri)


def end_parent_run(parent_run_id: str, status: str, tracking_uri: str) -> None:
    """End the search's parent run without a best trial: KILLED when the search was
    interrupted, FAILED when every trial failed."""
    client = _client(tracking_uri)
    _retry(lambda: client.set_terminated(parent_run_id, status),
           f"ending the search's parent run {status}", tracking_uri)


# ---------------------------------------------------------------------------------------------
# Child runs (one per trial, driven from the trial's process)


class TrialRun:
    """The MLflow run of one trial: found again after a retry or resume, else created.

    Args:
        tracking_uri: an absolute URI (see `resolve_tracking_uri`).
        experiment_id: the study's experiment.
        parent_run_id: the search's parent run (None for `gazetune train`).
        trial_id: the Ray trial id; the run carries it as tag `ray.trial_id`.
        config: the trial's config: the keys that apply to its loss set are logged as params
            (once; a retry adds only new keys), the whole config as `config.json`.
        tags: more tags, set again on every (re)start (e.g. `ray.node_id`).
        number: the trial's number in the study (Optuna's), in its name and tag `trial_number`.

    Besides the per-epoch history, each new best epoch is logged as `best/val/auc/...` and
    `best_epoch`: the run's latest values of these are the epoch its checkpoint holds, which
    the runs table shows and the reports score.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str | None,
                 trial_id: str, config: Mapping, tags: Mapping | None = None,
                 number: int | None = None):
        self.tracking_uri = tracking_uri
        self.trial_id = trial_id
        self.config = dict(config)
        self._client = _client(tracking_uri)
        self._pending: list = []  # metrics not yet accepted by the store, oldest first
        self._last_step: dict[str, int] = {}  # per key, the last epoch the run holds
        tags = {k: str(v) for k, v in {**run_tags(), **method_tags(self.config),
                                       **_ray_node_tags(), **(tags or {})}.items()}
        if number is not None:
            tags[NUMBER_TAG] = str(number)
            tags["mlflow.runName"] = run_name(number, self.config)
        found = self._retry(lambda: find_trial_run(self._client, experiment_id, trial_id),
                            "looking up the trial's run")
        if found is None:
            run_tags_ = {TRIAL_TAG: trial_id, **tags}
            if parent_run_id:
                run_tags_[PARENT_TAG] = parent_run_id
            run_tags_.setdefault("mlflow.runName", f"trial-{trial_id}")
            self.run_id = self._retry(
                lambda: self._client.create_run(experiment_id, tags=run_tags_).info.run_id,
                "creating the trial's run")
        else:
            # A retry or a resume: the same run goes on, its history continues.
            self.run_id = found.info.run_id
            self._retry(lambda: self._client.update_run(self.run_id, status="RUNNING"),
                        "reopening the trial's run")
            for key in ("pruned", "failure"):
                if key in found.data.tags:
                    self._retry(partial(self._client.delete_tag, self.run_id, key),
                                f"clearing tag {key}")
            if tags:
                self._set_tags(tags)
            self._last_step = self._retry(lambda: _last_steps(self._client, found),
                                          "reading the trial's logged epochs")
        _log_new_params(self._client, self.run_id, flatten(applying(self.config)), tracking_uri,
                        retry=self._retry)
        self._retry(lambda: self._client.log_dict(self.run_id, _jsonable(self.config),
                                                  "config.json"),
                    "logging config.json")

    def log_epoch(self, report) -> None:
        """Log one `trainable.loop.EpochReport`: its metrics at step = epoch, and on a new best
        epoch the best checkpoint (`checkpoint/`, replacing the previous one) and figures."""
        from mlflow.entities import Metric

        now = _now_ms()
        # A resumed trial repeats the epochs after its last Tune checkpoint; the run was sent
        # them before the interruption (metrics go to MLflow before Tune), and MLflow would keep
        # both values. The first one stays: the run shows each epoch once.
        metrics = dict(report.metrics)
        if report.is_best:
            metrics.update({f"best/{k}": v for k, v in report.metrics.items()
                            if k.startswith("val/auc/")})
            metrics["best_epoch"] = report.epoch
        new = {k: v for k, v in metrics.items() if report.epoch > self._last_step.get(k, 0)}
        # The timestamp is fixed here: a batch sent again after a lost reply is then identical.
        self._pending += [Metric(k, float(v), now, report.epoch) for k, v in new.items()]
        self._last_step.update(dict.fromkeys(new, report.epoch))
        self._flush()
        if report.is_best:
            best = Path(report.checkpoint_dir) / "best"
            if best.is_dir():
                self._retry(lambda: self._client.log_artifacts(self.run_id, str(best),
                                                               "checkpoint"),
                            "uploading the best checkpoint")
            for path in (report.figures or {}).values():
                self._retry(partial(self._client.log_artifact, self.run_id, str(path), "figures"),
                            f"uploading figure {Path(path).name}")

    def finish(self, status: str = "FINISHED", pruned: bool = False,
               failure: str | None = None) -> None:
        """End the run: FINISHED (tag `pruned`=`true` when stopped early) or, when `failure`
        gives a reason, FAILED with that reason in tag `failure`."""
        self._flush()
        _terminate(self._client, self.run_id, status, pruned, failure, self._retry)

    def _flush(self) -> None:
        while self._pending:
            chunk = self._pending[:BATCH]
            self._retry(partial(self._client.log_batch, self.run_id, metrics=chunk),
                        f"logging {len(self._pending)} metric values")
            del self._pending[:len(chunk)]  # only what the store accepted leaves the buffer

    def _set_tags(self, tags: Mapping) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._retry(lambda: self._client.log_batch(self.run_id, tags=batch), "setting tags")

    def _retry(self, call: Callable[[], T], what: str) -> T:
        return _retry(call, what, self.tracking_uri)


def finish_trial_run(tracking_uri: str, experiment_id: str, trial_id: str, status: str,
                     pruned: bool = False, failure: str | None = None) -> str | None:
    """`TrialRun.finish` from the driver (a Tune callback), by the run's `ray.trial_id`.

    Returns the run id, or None when the trial never got as far as creating its run.
    """
    client = _client(tracking_uri)
    found = _retry(lambda: find_trial_run(client, experiment_id, trial_id),
                   "looking up the trial's run", tracking_uri)
    if found is None:
        return None

    def retry(call, what):
        return _retry(call, what, tracking_uri)

    _terminate(client, found.info.run_id, status, pruned, failure, retry)
    return found.info.run_id


def _last_steps(client, run) -> dict[str, int]:
    """The highest step logged for each metric of `run` (one history request per key: only
    when a trial resumes)."""
    return {key: max((m.step for m in client.get_metric_history(run.info.run_id, key)),
                     default=0)
            for key in run.data.metrics}


def find_trial_run(client, experiment_id: str, trial_id: str):
    """The run tagged with this Ray trial id (the oldest, should there ever be two), or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    return runs[0] if runs else None


def find_trial_runs(tracking_uri: str, experiment_name: str) -> list:
    """The study's trial runs (`mlflow.entities.Run`, oldest first); [] for an unknown study."""
    client = _client(tracking_uri)
    # Retried: the driver reads the runs when the search ends, right after a possible outage.
    experiment = _retry(lambda: client.get_experiment_by_name(experiment_name),
                        "looking up the experiment", tracking_uri)
    if experiment is None:
        return []
    runs, token = [], None
    while True:
        page = _retry(partial(client.search_runs, [experiment.experiment_id],
                              filter_string=f"tags.`{TRIAL_TAG}` != ''",
                              order_by=["attributes.start_time ASC"], page_token=token),
                      "listing the trials' runs", tracking_uri)
        runs += page
        token = page.token
        if not token:
            return runs


# ---------------------------------------------------------------------------------------------
# Reading a study (export, evaluate): every call with the same bounded retries


class RetryingClient:
    """An `MlflowClient` whose every call rides out a store that is briefly down (`_retry`)."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self._client = _client(tracking_uri)

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            return _retry(lambda: method(*args, **kwargs), f"calling {name}", self.tracking_uri)

        return call


def client(tracking_uri: str) -> RetryingClient:
    """The client of export and evaluate."""
    return RetryingClient(tracking_uri)


def download_artifact(tracking_uri: str, run_id: str, artifact_path: str, dst: str | Path) -> str:
    """A run's artifact (file or folder) downloaded into `dst`; its local path.

    Raises:
        GazetuneError: the run has no such artifact (asked first: MLflow reports a missing
            artifact as an internal error, which would be retried like a server that is down).
    """
    import mlflow.artifacts

    store = client(tracking_uri)
    folder = artifact_path.rpartition("/")[0] or None
    if artifact_path not in {a.path for a in store.list_artifacts(run_id, folder)}:
        raise GazetuneError(f"run {run_id} at {tracking_uri} has no artifact {artifact_path}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return _retry(lambda: mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact_path, dst_path=str(dst),
        tracking_uri=tracking_uri), f"downloading {artifact_path} of run {run_id}", tracking_uri)


class EvaluationRun:
    """A run that records a test evaluation (`evaluation_run`)."""

    def __init__(self, client: RetryingClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log(self, metrics: Mapping[str, float], params: Mapping[str, object]) -> None:
        from mlflow.entities import Metric, Param

        now = _now_ms()
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                     if math.isfinite(v)],
            params=[Param(k, str(v)) for k, v in params.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)


@contextmanager
def evaluation_run(tracking_uri: str, experiment_name: str, run_name: str,
                   tags: Mapping[str, str]):
    """A new run of the study's experiment (under the search's parent run when `tags` name it
    as `mlflow.parentRunId`): FINISHED when the block ends, FAILED with the reason when it
    raises."""
    store = client(tracking_uri)
    experiment = store.get_experiment_by_name(experiment_name)
    run_id = store.create_run(experiment.experiment_id, run_name=run_name,
                              tags={**run_tags(), **tags}).info.run_id
    try:
        yield EvaluationRun(store, run_id)
    except BaseException as err:
        store.set_tag(run_id, "failure", f"{type(err).__name__}: {err}"[:5000])
        store.set_terminated(run_id, "FAILED")
        raise
    store.set_terminated(run_id, "FINISHED")


def delete_other_runs(tracking_uri: str, experiment_name: str, kind: str, keep: str) -> None:
    """Delete the study's runs tagged `gazetune.kind` = `kind` other than `keep`: a report
    written again replaces its run instead of adding a copy."""
    store = client(tracking_uri)
    experiment = store.get_experiment_by_name(experiment_name)
    for old in store.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`gazetune.kind` = '{kind}'"):
        if old.info.run_id != keep:
            store.delete_run(old.info.run_id)


# ---------------------------------------------------------------------------------------------
# `gazetune train`: one trial without Ray, logged like a search trial


def train_logged(config: dict, experiment: str, tracking_uri: str | None) -> dict:
    """Train one configuration with `trainable.train`, logged as one MLflow run.

    The run is FINISHED when training ends, FAILED with the reason when it raises (the error
    is raised again), KILLED on Ctrl-C. Returns the trainable's final metrics.
    """
    from trainable import train

    uri = resolve_tracking_uri(tracking_uri, Path.cwd())
    check_store_writable(uri)
    experiment_id = ensure_experiment(experiment, uri)
    run = TrialRun(uri, experiment_id, None, f"train-{uuid.uuid4().hex[:8]}", config,
                   tags={"gazetune.role": "train"})
    print(f"MLflow run {run.run_id} in experiment {experiment!r} at {uri}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="gazetune-train-") as scratch:
        # Without a checkpoint folder of its own the trial writes to a temporary one that MLflow
        # receives the best checkpoint from; the params keep the config as the user gave it.
        run_config = {"checkpoint_dir": scratch, **config}
        try:
            result = train(run_config, report=run.log_epoch)
        except KeyboardInterrupt:
            run.finish("KILLED")
            raise
        except Exception as err:
            run.finish(failure=f"{type(err).__name__}: {err}")
            raise
    run.finish()
    return result


# ---------------------------------------------------------------------------------------------
# Helpers


def _retry(call: Callable[[], T], what: str, tracking_uri: str) -> T:
    """Run one MLflow call, retrying transient failures with exponential backoff.

    Waits at most `GAZETUNE_MLFLOW_RETRY_S` seconds in all (read at each call, so a test or a
    user can shorten it); then raises `TrackingError` naming the tracking URI. Errors the store
    answered deliberately (a bad request, a missing run) are raised at once.
    """
    # A dozen lines rather than a retry library: the project pins no such library, and the
    # rule for what counts as transient is MLflow-specific anyway.
    budget = float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))
    deadline = time.monotonic() + budget
    delay, warned = 0.5, False
    while True:
        try:
            return call()
        except Exception as err:
            if _refused_credentials(err):
                given = "were refused" if credentials_from_env() else "are not set"
                raise TrackingError(
                    f"MLflow tracking server {tracking_uri} requires a login while {what}: "
                    f"{' and '.join(CREDENTIAL_ENV)} {given}") from None
            if not _transient(err):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingError(
                    f"MLflow tracking store {tracking_uri} unreachable for {budget:.0f} s "
                    f"({RETRY_ENV}) while {what}: {_first_line(err)}"
                ) from err
            if not warned:
                log.warning("MLflow tracking store %s failed while %s (%s); retrying for up "
                            "to %.0f s", tracking_uri, what, _first_line(err), budget)
                warned = True
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def _refused_credentials(err: Exception) -> bool:
    """An answer of a server with authentication: 401 (no or wrong login), 403 (no right)."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.get_http_status_code() in (401, 403)


def _transient(err: Exception) -> bool:
    """A server that is down, overloaded or restarting (worth retrying), as opposed to an
    answer such as "invalid parameter" or "run not found"."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    if isinstance(err, MlflowException):
        # Connection failures reach us as INTERNAL_ERROR (500); 429 is a server asking us to
        # slow down.
        status = err.get_http_status_code()
        return status >= 500 or status == 429
    # OperationalError: a SQLite store that is locked by another writer or on a lost mount.
    return isinstance(err, (OSError, OperationalError)) or type(err).__module__.startswith(
        ("requests", "urllib3"))


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    for key, value in CLIENT_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri)


def _log_new_params(client, run_id: str, params: Mapping[str, str], tracking_uri: str,
                    retry=None) -> None:
    """Log the params the run does not have yet: MLflow refuses to change a logged value."""
    from mlflow.entities import Param

    retry = retry or (lambda call, what: _retry(call, what, tracking_uri))
    logged = retry(lambda: client.get_run(run_id).data.params, "reading the run's params")
    changed = {k: (logged[k], v) for k, v in params.items() if k in logged and logged[k] != v}
    if changed:
        log.warning("run %s keeps its first values of params %s", run_id, sorted(changed))
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    for i in range(0, len(new), PARAMS_BATCH):
        chunk = new[i:i + PARAMS_BATCH]
        retry(partial(client.log_batch, run_id, params=chunk), "logging params")


def _terminate(client, run_id: str, status: str, pruned: bool, failure: str | None,
               retry) -> None:
    tags = {}
    if status == "FINISHED" and failure is None:
        tags["pruned"] = "true" if pruned else "false"
    if failure is not None:
        status = "FAILED"
        tags["failure"] = failure[:5000]  # MLflow caps tag values; the head says what failed
    for key, value in tags.items():
        retry(partial(client.set_tag, run_id, key, value), f"setting tag {key}")
    retry(lambda: client.set_terminated(run_id, status), f"ending the run {status}")


def applying(config: Mapping) -> dict:
    """The keys of a trial config that matter to its training (`trainable.config.matters`),
    without the trial's scratch folder: what a person compares runs by."""
    return {k: v for k, v in config.items() if k != "checkpoint_dir" and matters(k, config)}


def method_tags(config: Mapping) -> dict[str, str]:
    """`loss_set`, and `generator` where the loss set computes a map."""
    loss_set = str(config.get("loss_set", "baseline"))
    tags = {"loss_set": loss_set}
    if loss_set in LOSS_SETS and LOSS_SETS[loss_set].uses_map:
        tags["generator"] = str(config.get("generator", "guided_backprop"))
    return tags


def run_name(number: int, config: Mapping) -> str:
    """A trial's run name a person reads: `07 set3 deconvnet`."""
    return " ".join([f"{number:02d}", *method_tags(config).values()])


@cache
def run_tags() -> dict[str, str]:
    """What made every run: gazetune's version and, from a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tags = {VERSION_TAG: version("gazetune")}
    except PackageNotFoundError:
        tags = {VERSION_TAG: "unknown"}
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True)
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass  # installed from a wheel or without git: the version says what it was
    return tags


def flatten(settings: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys, string values.

    >>> flatten({"a": 1, "b": {"c": None}})
    {'a': '1', 'b.c': 'None'}
    """
    out: dict[str, str] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _jsonable(config: Mapping) -> dict:
    return json.loads(json.dumps(dict(config), default=str))


def _ray_node_tags() -> dict[str, str]:
    """`ray.node_id` of the node running this trial, when inside a Ray worker."""
    ray = sys.modules.get("ray")  # never import Ray here: `gazetune train` runs without it
    if ray is None or not ray.is_initialized():
        return {}
    return {"ray.node_id": ray.get_runtime_context().get_node_id()}


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# The best checkpoint as an MLflow Model (`gazetune export --register`, `gazetune predict`)
#
# Logged from code (MLflow's models-from-code): the model is `search/mlflow_model.py` plus the
# checkpoint's three files, so loading it unpickles nothing of ours. It is an MLflow 3 logged
# model of the trial's run (`runs:/<run_id>/model`, `models:/<model_id>`), created without
# reopening the run: the run keeps its status and end time.

MODEL_NAME = "model"  # the logged model's name in its trial's run: runs:/<run_id>/model
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
MODEL_CHECKPOINT = "checkpoint"  # the artifact that `search/mlflow_model.py` loads
# What the model needs to load, pinned to the versions that logged it (`mlflow models serve`
# builds its environment from them). gazetune itself is not on PyPI: install this repository
# where the model is loaded.
MODEL_PACKAGES = ("mlflow", "torch", "segmentation-models-pytorch", "numpy", "pandas")


def model_signature(image_size: int):
    """Images float32 [N, S, S] in, probabilities of Normal, CHF and pneumonia out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    from trainable.config import CLASS_NAMES

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, image_size, image_size))]),
        outputs=Schema([ColSpec("double", name) for name in CLASS_NAMES]))


def logged_model_uri(tracking_uri: str, run_id: str) -> str | None:
    """`models:/<model_id>` of the run's complete (READY) logged model `MODEL_NAME`, or None."""
    found = _logged_model(client(tracking_uri), run_id, ready=True)
    return None if found is None else f"models:/{found.model_id}"


def log_model(tracking_uri: str, run_id: str, checkpoint_dir: str | Path, image_size: int,
              step: int = 0) -> str:
    """Log a best checkpoint as an MLflow Model of the trial's run; returns `models:/<id>`.

    Args:
        tracking_uri: the study's store.
        run_id: the trial's run; it is not reopened (status and end time stay as they are).
        checkpoint_dir: model.pt, config.json and metrics.json.
        image_size: the side S of the images the model takes: its signature, and the model's
            copy of metrics.json records it (`trainable.inference.Classifier` reads it there).
        step: the epoch the checkpoint holds (the run's output link records it).

    A model that an interrupted call left PENDING is completed rather than logged twice; every
    call to the store goes through `_retry`.
    """
    import shutil
    import warnings

    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    store = client(tracking_uri)
    run = store.get_run(run_id)
    model = _logged_model(store, run_id, ready=False)
    if model is None:
        model = store.create_logged_model(
            run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
            params=dict(run.data.params), tags={"gazetune.kind": "best_checkpoint"})
        store.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    with tempfile.TemporaryDirectory(prefix="gazetune-model-") as scratch:
        files = Path(scratch) / MODEL_CHECKPOINT
        files.mkdir()
        for name in ("model.pt", "config.json", "metrics.json"):
            shutil.copyfile(Path(checkpoint_dir) / name, files / name)
        _record_image_size(files / "metrics.json", image_size)
        local = Path(scratch) / "model"
        with warnings.catch_warnings():
            # The signature says what the model takes; an input example would be an image.
            warnings.filterwarnings("ignore", ".*An input example was not provided")
            mlflow.pyfunc.save_model(
                str(local), python_model=str(MODEL_CODE),
                artifacts={MODEL_CHECKPOINT: str(files)}, signature=model_signature(image_size),
                pip_requirements=_model_requirements(),
                metadata={"image_size": image_size, "gazetune.run_id": run_id},
                mlflow_model=Model(artifact_path=model.artifact_location, run_id=run_id,
                                   model_uuid=model.model_id, model_id=model.model_id))
        store.log_model_artifacts(model.model_id, str(local))
    store.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return f"models:/{model.model_id}"


def register_model(tracking_uri: str, model_uri: str, name: str,
                   run_id: str | None = None) -> str:
    """Register a logged model (`models:/<model_id>`) as a version of registered model `name`
    (created on first use); returns the version. A model registered under `name` before keeps
    its version: registering it again adds none."""
    from mlflow.exceptions import MlflowException

    store = client(tracking_uri)
    model_id = model_uri.removeprefix("models:/")
    try:
        store.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    for version in store.search_model_versions(f"name = '{name}'"):
        if version.model_id == model_id or version.source == model_uri:
            return str(version.version)
    return str(store.create_model_version(name, source=model_uri, run_id=run_id,
                                          model_id=model_id).version)


def load_model(model_uri: str, tracking_uri: str | None = None):
    """`mlflow.pyfunc.load_model(model_uri)` with the bounded retries.

    Args:
        model_uri: `models:/NAME/VERSION`, `models:/<model_id>`, `runs:/<run_id>/model`, or the
            folder of a downloaded model.
        tracking_uri: the store (and registry) that `models:/` and `runs:/` URIs refer to.

    Raises:
        TrackingError: no model there, or the store unreachable; one line naming the URI.
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    local = "://" not in model_uri and not model_uri.startswith(("models:", "runs:"))
    if local and not (Path(model_uri) / "MLmodel").is_file():
        raise TrackingError(f"model {model_uri}: no MLflow model there (a folder holding MLmodel "
                            f"is expected, or a models:/ or runs:/ URI)")
    for key, value in CLIENT_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    where = f" at {tracking_uri}" if tracking_uri else ""
    try:
        with _store_environment(tracking_uri):
            return _retry(lambda: mlflow.pyfunc.load_model(model_uri),
                          f"loading model {model_uri}", tracking_uri or model_uri)
    except MlflowException as err:
        raise TrackingError(f"model {model_uri}{where}: {_first_line(err)}") from None


@contextmanager
def _store_environment(tracking_uri: str | None):
    """MLflow's store and registry for the fluent calls of the block (`models:/` URIs resolve
    through the registry of the process, not through a client): set in the environment and
    restored after it, so that nothing outlives the call."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {key: os.environ.get(key) for key in keys}
    if tracking_uri is not None:
        os.environ.update(dict.fromkeys(keys, tracking_uri))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _logged_model(store, run_id: str, ready: bool):
    """The run's logged model `MODEL_NAME`: READY (`ready`) or PENDING, newest first; None."""
    from mlflow.entities import LoggedModelStatus

    experiment_id = store.get_run(run_id).info.experiment_id
    wanted = LoggedModelStatus.READY if ready else LoggedModelStatus.PENDING
    found, token = [], None
    while True:
        page = store.search_logged_models(experiment_ids=[experiment_id],
                                          filter_string=f"name = '{MODEL_NAME}'",
                                          page_token=token)
        found += [m for m in page if m.source_run_id == run_id and m.status == wanted]
        token = page.token
        if not token:
            break
    return max(found, key=lambda m: m.creation_timestamp, default=None)


def _record_image_size(metrics_json: Path, image_size: int) -> None:
    """metrics.json with `image_size` (a checkpoint from before training recorded it)."""
    metrics = json.loads(metrics_json.read_text())
    recorded = metrics.setdefault("image_size", image_size)
    if recorded != image_size:
        raise GazetuneError(f"{metrics_json}: the checkpoint records image size {recorded}, "
                            f"not {image_size}")
    metrics_json.write_text(json.dumps(metrics, indent=2, sort_keys=True))


def _model_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in MODEL_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins
