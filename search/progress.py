"""What a person sees of a running search: a console line per trial event, a summary a minute,
and how a trial ended, in words."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from ray.tune import Callback

from search.searcher import TRIAL_NUMBER
from trainable.config import METRIC, matters
from trainable.loss_sets import LOSS_SETS


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


def describe(config: dict) -> str:
    """A trial's sampled configuration in one short line."""
    method = config.get("loss_set", "?")
    if config.get("generator") and method in LOSS_SETS and LOSS_SETS[method].uses_map:
        method += f"/{config['generator']}"
    # What did nothing for this loss set (a space's constant such as seg_loss for the
    # classifier) would only mislead.
    rest = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in config.items()
                    if k not in ("loss_set", "generator", TRIAL_NUMBER)
                    and matters(k, config))
    number = f"#{config[TRIAL_NUMBER]} " if TRIAL_NUMBER in config else ""
    return f"{number}{method} {rest}".strip()


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _best_value(trial, metric: str) -> float | None:
    value = (trial.metric_analysis.get(metric) or {}).get("max")
    return None if value is None or math.isnan(value) else value  # NaN: no score


class ProgressPrinter(Callback):
    """Console progress a person can follow: a line per trial event, a summary every minute."""

    metric = METRIC  # the class's: a printer pickled by an older search has no attribute

    def __init__(self, total: int, max_t: int, metric: str = METRIC, every_s: float = 60.0):
        self.total, self.max_t, self.metric, self.every_s = total, max_t, metric, every_s
        self._last = 0.0

    def setup(self, **info) -> None:
        self._last = time.monotonic()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        say(f"trial {trial.trial_id} started: {describe(trial.config)}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        say(f"trial {trial.trial_id} failed, retrying from its last checkpoint: "
            f"{failure_reason(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        how = "pruned" if stopped_early(trial, self.max_t) else "finished"
        best = _best_value(trial, self.metric)
        score = f", best {self.metric} {best:.3f}" if best is not None else ""
        say(f"trial {trial.trial_id} {how} after {epochs} epoch(s){score}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        say(f"trial {trial.trial_id} FAILED: {failure_reason(trial)}")

    def on_step_end(self, iteration, trials, **info) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            say(self.summary(trials))

    def on_experiment_end(self, trials, **info) -> None:
        say(self.summary(trials))

    def summary(self, trials) -> str:
        status = [t.status for t in trials]
        ended = [t for t in trials if t.status == "TERMINATED"]
        pruned = sum(stopped_early(t, self.max_t) for t in ended)
        line = (f"{len(ended)}/{self.total} trials done ({pruned} pruned), "
                f"{status.count('ERROR')} failed, {status.count('RUNNING')} running")
        scored = [(v, t) for t in trials
                  if t.status != "ERROR" and (v := _best_value(t, self.metric)) is not None]
        if scored:
            value, trial = max(scored, key=lambda pair: pair[0])
            line += f"; best {self.metric} {value:.3f} (trial {trial.trial_id}: " \
                    f"{describe(trial.config)})"
        return line
