"""One trial under Ray Tune: `trainable.train` wrapped with MLflow logging and Tune checkpoints.

`trial_fn` runs in a Ray worker. It logs each epoch to the trial's MLflow run *before* handing
the result to Tune, because code after the last `tune.report` never runs when the scheduler
stops a trial. For the same reason the run is ended on the driver, by `TrialRunCloser`, from
Tune's callbacks, which see every way a trial ends (done, stopped early, failed).

A tracking store that stays unreachable for a whole retry budget (`search.tracking`) stops the
search the way Ctrl-C does: Tune saves its state, and `gazetune resume` continues every trial
once the store is back. Retrying trials against a store that is down would only fail them all.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune
from ray.tune import Callback, Checkpoint

from search import tracking
from trainable.config import TrialConfig
from trainable.errors import DivergedError

SETTINGS_ENV = "GAZETUNE_SEARCH_SETTINGS"  # the running search's settings file, for callbacks


@dataclass(frozen=True)
class TrialSetup:
    """What the trials of one search share besides the sampled parameters."""

    cache: str  # absolute: trials run in their own directories
    epochs: int  # the scheduler's budget (ASHA's max_t)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    fixed: dict = field(default_factory=dict)  # `--set KEY=VALUE`, typed
    threads: int = 0  # torch threads: the CPUs Ray reserved for the trial
    gpu_fraction: float = 0.0  # the GPU share Ray reserved; the trial caps its memory to it
    # MLflow credentials of a server with authentication (`tracking.CREDENTIAL_ENV`): in Ray's
    # object store with the trial's parameters, never in Tune's saved state or in MLflow.
    credentials: dict = field(default_factory=dict, repr=False)

    def trial_config(self, sampled: dict, checkpoint_dir: Path) -> dict:
        """The `trainable.config.TrialConfig` dict of one trial."""
        return {
            "threads": self.threads,
            **self.fixed,
            **sampled,
            "cache": self.cache,
            "epochs": self.epochs,
            "gpu_memory_fraction": self.gpu_fraction,
            "checkpoint_dir": str(checkpoint_dir),
        }


def trial_fn(config: dict, setup: TrialSetup, train: Callable | None = None) -> None:
    """Train one sampled configuration, resuming from Tune's checkpoint after a failure.

    Args:
        config: the parameters the search space sampled.
        setup: the search's shared settings (passed with `tune.with_parameters`).
        train: the training function, `trainable.loop.train` unless given.
    """
    if train is None:
        from trainable.loop import train
    trial_id = tune.get_context().get_trial_id()
    # A diverged trial would diverge again: a retry starts from the same checkpoint with the
    # same seeds. Tune retries every error alike (up to `max_failures`), so the first attempt
    # leaves the reason in the working directory, which Ray 2.60 keeps for the trial across
    # its retries in one session (checked), and a retry fails at once with it. (A retry on
    # another node, or after `gazetune resume`, has a new directory: it trains again from the
    # last checkpoint, at most the one epoch up to the divergence.)
    diverged = Path.cwd() / f"diverged-{trial_id}"
    if diverged.is_file():
        raise DivergedError(diverged.read_text())
    # Ray runs each trial in its own working directory; the state written there is copied to
    # the search's storage by every `tune.report`, which is what a retry starts from.
    state = Path.cwd() / f"state-{trial_id}"
    shutil.rmtree(state, ignore_errors=True)  # a previous attempt's, newer than the checkpoint
    resume_from = None
    if checkpoint := tune.get_checkpoint():
        resume_from = checkpoint.to_directory(str(state))
    # The whole config, defaults included, is what MLflow keeps as the trial's params.
    trial_config = TrialConfig.from_dict(setup.trial_config(config, state)).to_dict()
    os.environ.update(setup.credentials)
    run = tracking.TrialRun(setup.tracking_uri, setup.experiment_id, setup.parent_run_id,
                            trial_id, trial_config)
    # Ray logs a line per persisted checkpoint (each epoch); the trial's run says it already.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

    def report(epoch_report) -> None:
        run.log_epoch(epoch_report)
        tune.report(dict(epoch_report.metrics),
                    checkpoint=Checkpoint.from_directory(epoch_report.checkpoint_dir))

    try:
        train(trial_config, report=report, resume_from=resume_from)
    except DivergedError as err:
        diverged.write_text(str(err))
        raise


class TrialRunCloser(Callback):
    """Ends each trial's MLflow run on the driver when Tune says the trial has ended.

    FINISHED, tagged `pruned` when the scheduler stopped it before its budget; FAILED with the
    reason once Tune gives up retrying it. Tune pickles callbacks with the experiment and a
    resumed search cannot replace them, so this one holds nothing: at setup it reads the
    search's current settings from the file named by `$GAZETUNE_SEARCH_SETTINGS` (set by the
    service), which a resume may have changed (another tracking URI, a moved storage folder).
    """

    def setup(self, **info) -> None:
        from search.service import SearchSettings

        self._settings = SearchSettings.load(os.environ[SETTINGS_ENV])
        self._stopping = False
        _outage.clear()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FINISHED", pruned=stopped_early(trial, self._settings.max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FAILED", failure=failure_reason(trial))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # The trial waited out the whole retry budget: its retry would wait again, and so
        # would every other trial.
        reason = failure_reason(trial)
        if reason.startswith(f"{tracking.TrackingError.__name__}: "):
            _outage.append(tracking.TrackingError(reason.partition(": ")[2]))

    def on_step_end(self, iteration, trials, **info) -> None:
        if not _outage or self._stopping:
            return
        self._stopping = True
        print(f"MLflow tracking store {self._settings.tracking_uri} unreachable: stopping the "
              f"search", flush=True)
        # The trials still waiting on the store fail after the stop, and nobody fetches their
        # results: Ray would print each one's remote traceback.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        if not callable(signal.getsignal(signal.SIGUSR1)):
            raise _outage[0]  # Tune runs outside the main thread: no graceful stop
        # Tune has no call that ends an experiment and keeps its unfinished trials resumable
        # (a Stopper ends them as TERMINATED); its handler of SIGUSR1 (and of Ctrl-C) does:
        # it saves the state one last time and returns from `fit`.
        os.kill(os.getpid(), signal.SIGUSR1)

    def _finish(self, trial, status: str, **how) -> None:
        if _outage:
            return  # the store is down: the resumed search ends the run (service.py)
        s = self._settings
        try:
            tracking.finish_trial_run(s.tracking_uri, s.experiment_id, trial.trial_id, status,
                                      **how)
        except tracking.TrackingError as err:
            # Raised from here, Tune would turn a finished trial into a failed one and then
            # end the search with a traceback: stop at the end of this step instead.
            _outage.append(err)

    def __getstate__(self) -> dict:
        return {}  # read again at setup


# The outage that stopped the search, read by the service when `fit` returns: Tune runs its
# own (unpickled, on resume) copy of the callback, which the service cannot reach.
_outage: list[tracking.TrackingError] = []


def tracking_outage() -> tracking.TrackingError | None:
    """Why the search stopped early for want of its tracking store, or None."""
    return _outage[0] if _outage else None


def stopped_early(trial, max_t: int) -> bool:
    """Whether a trial that ended without error had run fewer epochs than the budget."""
    return (trial.last_result or {}).get("training_iteration", 0) < max_t


def failure_reason(trial) -> str:
    """The last line of the trial's latest error: `Type: message` for a Python exception."""
    # Tune writes the error on the driver first and copies it to storage later, so the local
    # file is the one that exists while the callbacks run.
    local = Path(trial.error_file) if trial.error_file else None
    text = local.read_text() if local and local.is_file() else trial.get_error() or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "the trial failed (no error recorded)"
    # A traceback names the project's exceptions with their module (trainable.errors.X).
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )", "", lines[-1])
