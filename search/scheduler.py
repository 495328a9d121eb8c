"""ASHA, the search's early stopping, with its state saved in Tune's snapshots.

Tune saves the trials' and the searcher's state but never the scheduler's, so a search killed
and resumed would judge the rungs without the results recorded before the kill, and could stop
a trial the uninterrupted search kept (measured: 2 of 3 kill points of a toy search differed).
`ASHAState` is a Tune callback: Tune saves every callback's `get_state()` in each snapshot,
right after the trials' and the searcher's (`TuneController.save_to_dir`), and `Tuner.restore`
hands it back to `set_state()` before the restored trials are added again
(`TuneController.resume`). It holds the scheduler of `TuneConfig`; both are pickled together in
Tune's tuner.pkl, so a restored callback holds the restored scheduler.

A resumed trial reports again the epochs after its last checkpoint; a rung that recorded the
trial skips it (`_Bracket.on_result`), so a decision ASHA took stands: CONTINUE, or STOP, which
Tune keeps in the same snapshot until the trial's checkpoint is saved and then carries out.
This relies on one checkpoint per reported epoch, which is how the trials report.

With `--paper-points` the paper's configurations, queued as the study's first trials, run their
whole budget (`PaperPointsASHA`): stopped after an epoch or two, as ASHA would stop most of
them, they could not be compared with each other at all.
"""

from __future__ import annotations

import logging

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from search.searcher import TRIAL_NUMBER

logger = logging.getLogger(__name__)


def asha(max_t: int, grace_period: int, reduction_factor: int,
         paper_points: int = 0) -> PaperPointsASHA:
    """One bracket of ASHA over epochs (`training_iteration`); the first `paper_points` trials
    of the study (the paper's configurations, when queued) run to `max_t`."""
    return PaperPointsASHA(time_attr="training_iteration", max_t=max_t,
                           grace_period=grace_period, reduction_factor=reduction_factor,
                           paper_points=paper_points)


class PaperPointsASHA(AsyncHyperBandScheduler):
    """ASHA that never stops the trials numbered below `paper_points` before `max_t`, and no
    trial at `max_t` (where its function ends by itself).

    The searcher queues the paper's points as the study's first trials, so a trial's number
    (`TRIAL_NUMBER` in its config) says whether it is one. The count is pickled with the
    scheduler in Tune's state, so a resumed search keeps the same points, and a search started
    afresh by `gazetune resume` takes it from the saved settings, as the first start did.
    """

    def __init__(self, *args, paper_points: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.paper_points = paper_points

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        # The points' results still go into the rungs (ASHA records a result as it judges it):
        # they are the search's first trials, so without them the first sampled trials would
        # meet empty rungs and pass unjudged, and they are honest results at that epoch.
        # ASHAState saves them with the rest, so a resumed search judges against the same rungs.
        action = super().on_trial_result(tune_controller, trial, result)
        # At max_t the trial's own function ends (it trains max_t epochs): a stop there would
        # make Tune exit the trial's training thread (`sys.exit` in `tune.report`) while the
        # actor shuts down, and the thread, still freeing its tensors, aborts the worker
        # (SIGABRT and a C++ stack trace in the search's output, seen in 2 of the demo's 8).
        if action == TrialScheduler.STOP and (result[self._time_attr] >= self._max_t
                                              or self._is_paper_point(trial)):
            self._num_stopped -= 1  # counted by ASHA as it decided to stop it
            return TrialScheduler.CONTINUE
        return action

    def _is_paper_point(self, trial) -> bool:
        number = (trial.config or {}).get(TRIAL_NUMBER)
        return isinstance(number, int) and 0 <= number < self.paper_points


class ASHAState(Callback):
    """Saves what ASHA's rungs recorded with each of Tune's snapshots, and restores it."""

    def __init__(self, scheduler: AsyncHyperBandScheduler):
        self._scheduler = scheduler
        self._step = None  # Tune's step counter, saved with its state: the snapshot's identity
        self._restored_step = None

    def get_state(self) -> dict:  # never empty: Tune saves no falsy state
        return {"step": self._step, "num_stopped": self._scheduler._num_stopped,
                "rungs": [[(milestone, dict(recorded)) for milestone, recorded in bracket._rungs]
                          for bracket in self._scheduler._brackets]}

    def set_state(self, state: dict) -> None:
        for bracket, rungs in zip(self._scheduler._brackets, state["rungs"], strict=True):
            for (milestone, recorded), (saved_milestone, saved) in zip(bracket._rungs, rungs,
                                                                       strict=True):
                if milestone != saved_milestone:
                    raise ValueError(f"ASHA's rungs changed since the search started: "
                                     f"{saved_milestone} is now {milestone}")
                recorded.clear()  # in place: the trials added next point at these brackets
                recorded.update(saved)
        self._scheduler._num_stopped = state["num_stopped"]
        self._restored_step = state["step"]

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._restored_step is not None and self._restored_step != iteration:
            # Tune uploads its state files in the background: a driver killed mid-upload can
            # leave them from different snapshots (the searcher's state too).
            logger.warning("ASHA's state is from Tune's step %s, the trials' from step %s",
                           self._restored_step, iteration)
        self._restored_step = None
        self._step = iteration

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._step = iteration  # the final snapshot is taken after the last step
