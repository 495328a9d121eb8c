"""Optuna as Ray Tune's searcher, told the truth about trials the scheduler stopped early.

Ray's `OptunaSearch` closes every trial that ends without an error as COMPLETE with its last
value, so a trial ASHA stopped after one epoch counts for TPE as a finished trial with a poor
score (measured). Here such a trial is PRUNED with its intermediate values: Optuna's samplers
know what pruned means, and the study says which trials ran their full budget. A COMPLETE
trial's value is its best epoch's, the epoch its checkpoint holds and the reports score.

Each suggested config carries the Optuna trial's number (`TRIAL_NUMBER`), so that the trial's
MLflow run, the report and the study all call a trial by the same number.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

TRIAL_NUMBER = "trial_number"  # added to each suggested config; not a trial setting


def tpe_sampler(seed: int | None) -> optuna.samplers.TPESampler:
    """Seeded TPE for parallel trials on conditional spaces.

    multivariate + group model the parameters of one branch jointly (the define-by-run spaces
    are conditional); constant_liar keeps concurrent suggestions apart while trials run.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True)


class PruningAwareOptunaSearch(OptunaSearch):
    """`OptunaSearch` that records trials stopped before `max_t` as PRUNED.

    Args:
        *args, **kwargs: as `ray.tune.search.optuna.OptunaSearch`.
        max_t: the scheduler's budget in `training_iteration`s (epochs); a trial that ends
            without error before reaching it was stopped early.

    The study lives in memory and is pickled with Tune's experiment state: an RDB-backed study
    runs ahead of that state and cannot be restored after the driver is killed (measured).
    """

    def __init__(self, *args, max_t: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_t = max_t

    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        if params is None:
            return None
        return {**params, TRIAL_NUMBER: self._ot_trials[trial_id].number}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        iteration = (result or {}).get("training_iteration")
        if error or iteration is None or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        ot_trial = self._ot_trials[trial_id]
        value = result.get(self.metric)
        # Tune passes the result that made the scheduler stop the trial (also at max_t) only
        # here, not to on_trial_result: report it so the history is complete.
        reported = self._ot_study.get_trials(deepcopy=False)[ot_trial.number].intermediate_values
        if value is not None and iteration not in reported:
            ot_trial.report(value, iteration)
        if self._max_t is None or iteration >= self._max_t:
            # The best epoch's value: the trial's checkpoint is that epoch's model.
            history = self._ot_study.get_trials(deepcopy=False)[ot_trial.number] \
                .intermediate_values.values()
            finite = [v for v in history if math.isfinite(v)]
            if finite:
                self._ot_study.tell(ot_trial, max(finite) if self.mode == "max" else min(finite))
            else:  # no epoch had a defined score
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        else:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)  # value: the last reported
        self._completed_trials.add(trial_id)

def load_study(experiment_dir: str | Path) -> optuna.Study:
    """The Optuna study of a search, from the searcher state Tune saved in its folder."""
    searcher = PruningAwareOptunaSearch()
    searcher.restore_from_dir(str(experiment_dir))
    return searcher.study
