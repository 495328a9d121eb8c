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
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune
from ray.tune import Callback, Checkpoint

from search import storage, tracking
from search.progress import failure_reason, stopped_early
from search.searcher import TRIAL_NUMBER
from search.settings import SETTINGS_FILE, SearchSettings
from trainable.config import TrialConfig
from trainable.errors import DivergedError

# Written into the search's folder by `TrialRunCloser` when the tracking store stayed
# unreachable, and read by the service when Tune returns: Tune runs its own (on resume,
# unpickled) copy of the callback, which the service cannot reach.
OUTAGE_FILE = "tracking-outage.txt"


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

    @classmethod
    def of(cls, settings: SearchSettings) -> TrialSetup:
        return cls(
            cache=settings.cache, epochs=settings.max_epochs,
            tracking_uri=settings.tracking_uri, experiment_id=settings.experiment_id,
            parent_run_id=settings.parent_run_id, fixed=settings.fixed,
            threads=max(1, int(settings.cpus_per_trial)),
            gpu_fraction=settings.gpus_per_trial or 0.0,
            credentials=tracking.credentials_from_env(),
        )

    def trial_config(self, sampled: dict, checkpoint_dir: Path) -> dict:
        """The `trainable.config.TrialConfig` dict of one trial (`sampled`: Tune's config)."""
        return {
            "threads": self.threads,
            **self.fixed,
            **{k: v for k, v in sampled.items() if k != TRIAL_NUMBER},
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
                            trial_id, trial_config, number=config.get(TRIAL_NUMBER))
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
    finally:
        # Every report copied the state to the search's storage, and a retry starts from
        # there: left behind, each trial's ~100 MB would pile up in Ray's session folder
        # (/tmp/ray), which Ray never empties.
        shutil.rmtree(state, ignore_errors=True)


class TrialRunCloser(Callback):
    """Ends each trial's MLflow run on the driver when Tune says the trial has ended.

    FINISHED, tagged `pruned` when the scheduler stopped it before its budget; FAILED with the
    reason once Tune gives up retrying it. Tune pickles callbacks with the experiment and a
    resumed search cannot replace them, so this one holds nothing: it reads the search's
    current settings (which a resume may have changed: another tracking URI, a moved storage
    folder) from the folder Tune names for the trials, and leaves an outage of the tracking
    store in that folder (`OUTAGE_FILE`) for the service.
    """

    def setup(self, **info) -> None:
        self._settings: SearchSettings | None = None
        self._outage: tracking.TrackingError | None = None
        self._stopping = False

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FINISHED",
                     pruned=stopped_early(trial, self._settings_of(trial).max_epochs))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FAILED", failure=failure_reason(trial))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        # The trial waited out the whole retry budget: its retry would wait again, and so
        # would every other trial.
        reason = failure_reason(trial)
        if reason.startswith(f"{tracking.TrackingError.__name__}: "):
            self._stop(trial, tracking.TrackingError(reason.partition(": ")[2]))

    def on_step_end(self, iteration, trials, **info) -> None:
        if self._outage is None or self._stopping:
            return
        self._stopping = True
        print(f"MLflow tracking store {self._settings.tracking_uri} unreachable: stopping the "
              f"search", flush=True)
        # The trials still waiting on the store fail after the stop, and nobody fetches their
        # results: Ray would print each one's remote traceback.
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        if not callable(signal.getsignal(signal.SIGUSR1)):
            raise self._outage  # Tune runs outside the main thread: no graceful stop
        # Tune has no call that ends an experiment and keeps its unfinished trials resumable
        # (a Stopper ends them as TERMINATED); its handler of SIGUSR1 (and of Ctrl-C) does:
        # it saves the state one last time and returns from `fit`.
        os.kill(os.getpid(), signal.SIGUSR1)

    def _finish(self, trial, status: str, **how) -> None:
        if self._outage is not None:
            return  # the store is down: the resumed search ends the run
        s = self._settings_of(trial)
        try:
            tracking.finish_trial_run(s.tracking_uri, s.experiment_id, trial.trial_id, status,
                                      **how)
        except tracking.TrackingError as err:
            # Raised from here, Tune would turn a finished trial into a failed one and then
            # end the search with a traceback: stop at the end of this step instead.
            self._stop(trial, err)

    def _stop(self, trial, outage: tracking.TrackingError) -> None:
        if self._outage is None:
            self._outage = outage
            self._settings_of(trial)
            fs = trial.storage.storage_filesystem
            storage.write_text_on(fs, f"{trial.storage.experiment_fs_path}/{OUTAGE_FILE}",
                                  str(outage))

    def _settings_of(self, trial) -> SearchSettings:
        if self._settings is None:
            path = f"{trial.storage.experiment_fs_path}/{SETTINGS_FILE}"
            text = storage.read_text_on(trial.storage.storage_filesystem, path)
            self._settings = SearchSettings.from_json(text, path)
        return self._settings

    def __getstate__(self) -> dict:
        return {}  # set up again by Tune


def tracking_outage(settings: SearchSettings) -> str | None:
    """Why the search's last `fit` stopped for want of its tracking store, or None."""
    location = f"{settings.path}/{OUTAGE_FILE}"
    try:
        return storage.read_text(location)
    except (FileNotFoundError, NotADirectoryError):
        return None
