"""The read side of a study: its trials as MLflow recorded them, each scored at its best
validation epoch (where `val/auc/mean` peaks: the epoch its checkpoint holds), not its last.

`gazetune export` and `gazetune evaluate` both read a study through here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from search import tracking
from trainable.config import CLASS_NAMES, METRIC, SELECTION_METRICS, TrialConfig
from trainable.errors import GazetuneError
from trainable.loss_sets import LOSS_SETS

SCORES = ("mean", *CLASS_NAMES)  # the keys of `val` and `test`


@dataclass(frozen=True)
class Trial:
    """One trial of a study as MLflow recorded it, scored at its best validation epoch."""

    run_id: str
    number: int  # the study's (Optuna's) trial number, as in the run's name and tag
    status: str  # the run's status: FINISHED, FAILED, RUNNING, KILLED
    pruned: bool  # stopped early by the scheduler (tag `pruned`)
    params: dict  # as logged (strings)
    epochs: int  # epochs logged
    epoch: int | None  # the best validation epoch (None: no validation score)
    val: dict | None  # {name: [auc, lo, hi]} at that epoch, NaN as None
    figures: tuple[str, ...] = field(default=())  # artifact paths under figures/
    parent: str | None = None  # the search's parent run
    history: dict = field(default_factory=dict)  # {epoch: its selection metric}
    started: int | None = None  # the run's start and end, ms since the epoch
    ended: int | None = None

    @property
    def state(self) -> str:
        """Optuna's word for how the trial ended: COMPLETE, PRUNED, FAIL or RUNNING."""
        if self.status == "FINISHED":
            return "PRUNED" if self.pruned else "COMPLETE"
        return "FAIL" if self.status in ("FAILED", "KILLED") else "RUNNING"

    @property
    def score(self) -> float | None:
        """The selection metric at the best epoch (`val/auc/mean` unless the trial selected
        by `val/gaze_auc/mean`): what the search optimised and what ranks the trials."""
        if self.metric == METRIC:
            return (self.val or {}).get("mean", [None])[0]
        return None if self.epoch is None else finite(self.history.get(self.epoch))

    @property
    def method(self) -> tuple[str, str | None]:
        """(loss set, generator), the generator only for the loss sets that compute a map."""
        loss_set = self.params.get("loss_set", "baseline")
        generator = self.params.get("generator", "guided_backprop")
        return loss_set, generator if LOSS_SETS[loss_set].uses_map else None

    @property
    def metric(self) -> str:
        """The validation metric the trial selected its best epoch by."""
        return selection_metric(self.params)

    @property
    def label(self) -> str:
        """"set3/guided_backprop", or the loss set alone when it computes no map."""
        return "/".join(p for p in self.method if p)

    def config(self) -> dict:
        """The trial's config, typed (params are strings); the scratch folder left out."""
        config = typed_config(self.params)
        config.pop("checkpoint_dir")  # the trial's scratch folder; the checkpoint is in its run
        return config


def selection_metric(params: Mapping[str, str]) -> str:
    """The metric a run's params say it selected by (`selection`; runs logged before the key
    existed selected by `val/auc/mean`)."""
    return SELECTION_METRICS.get(params.get("selection", "auc"), METRIC)


def typed_config(params: Mapping[str, str]) -> dict:
    """A run's params (strings) as the trial's typed config.

    MLflow logged `None` as "None"; it is turned back into None first, since TrialConfig keeps
    a string for a `str | None` key (the encoder weights' file would be called "None").
    """
    return TrialConfig.from_dict({k: None if v == "None" else v
                                  for k, v in params.items()}).to_dict()


def read_trials(tracking_uri: str, name: str) -> list[Trial]:
    """Every trial run of study `name`, oldest first, scored at its best validation epoch.

    Raises:
        GazetuneError: no experiment of that name in the tracking store.
    """
    client = tracking.client(tracking.existing_store(tracking_uri))
    if client.get_experiment_by_name(name) is None:
        raise GazetuneError(f"no study {name!r} in the MLflow store {tracking_uri} (the study "
                            f"name is the experiment's name; check --tracking-uri)")
    trials = []
    for order, run in enumerate(tracking.find_trial_runs(tracking_uri, name)):
        # Runs that carry no number (logged before numbers were) count in order of start.
        number = int(run.data.tags.get(tracking.NUMBER_TAG, order))
        history = {key: _by_step(client.get_metric_history(run.info.run_id, key))
                   for key in run.data.metrics if key.startswith("val/auc/")}
        metric = selection_metric(run.data.params)
        if metric != METRIC:
            history[metric] = _by_step(client.get_metric_history(run.info.run_id, metric))
        epoch = best_epoch(history.get(metric, {}))
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
            parent=run.data.tags.get(tracking.PARENT_TAG), history=history.get(metric, {}),
            started=run.info.start_time, ended=run.info.end_time,
        ))
    return trials


def read_evaluations(tracking_uri: str, name: str) -> dict[str, dict]:
    """{trial's run id: its test scores} from the study's evaluation runs in MLflow (the latest
    evaluation of each trial), so that a report written anywhere shows them."""
    client = tracking.client(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.`gazetune.kind` = 'evaluation' "
                                            "and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    return {run.data.tags["evaluates"]: evaluation_scores(run.data.metrics) for run in runs
            if "evaluates" in run.data.tags}


def evaluation_scores(metrics: Mapping[str, float]) -> dict:
    """{name: [auc, lo, hi]} of an evaluation's `test/auc/...` metrics, NaN as None."""
    return {n: [finite(metrics.get(f"test/auc/{n}{b}")) for b in ("", "/lo", "/hi")]
            for n in SCORES}


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


def space_name(tracking_uri: str, trials: list[Trial]) -> str:
    """The search space the study used, from its parent run's params (`paper` if unknown)."""
    client = tracking.client(tracking_uri)
    for parent in sorted({t.parent for t in trials if t.parent}):
        space = client.get_run(parent).data.params.get("space")
        if space:
            return space
    return "paper"


def checkpoint_uri(run_id: str) -> str:
    """Where a trial's best checkpoint lives, for `mlflow.artifacts.download_artifacts`."""
    return f"runs:/{run_id}/checkpoint"


def data_origin_of(trial: Trial) -> str:
    """"synthetic", "real" or "unknown": what the trial's cache was prepared from."""
    from trainable.data.cache import data_origin

    return data_origin(trial.params.get("cache", ""))


def finite(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
