"""ASHA with `--paper-points`: the paper's configurations run their whole budget, and every other
trial is judged against rungs that hold the points' results too."""

import pickle

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from search.scheduler import ASHAState, asha
from search.searcher import TRIAL_NUMBER

METRIC = "val/auc/mean"
MAX_T = 4
CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def scheduler(paper_points: int):
    s = asha(MAX_T, grace_period=1, reduction_factor=2, paper_points=paper_points)
    s.set_search_properties(METRIC, "max")  # as Tune does from TuneConfig
    return s


def trial(number: int) -> Trial:
    """A Tune trial as the searcher suggests it: its study number in the config."""
    return Trial("trainable", config={TRIAL_NUMBER: number, "lr": 1e-3}, trial_id=f"t{number}",
                 stub=True)  # stub: no registered trainable needed


def report(s, t: Trial, epoch: int, auc: float) -> str:
    return s.on_trial_result(None, t, {"training_iteration": epoch, METRIC: auc})


def added(s, *numbers: int) -> list[Trial]:
    trials = [trial(n) for n in numbers]
    for t in trials:
        s.on_trial_add(None, t)
    return trials


def test_a_paper_point_with_a_poor_epoch_continues_where_a_sampled_trial_stops():
    s = scheduler(paper_points=2)
    good, poor_point, poor_sampled = added(s, 0, 1, 2)
    assert report(s, good, 1, 0.9) == CONTINUE  # fills the first rung
    assert report(s, poor_point, 1, 0.5) == CONTINUE  # a paper point: not judged
    assert report(s, poor_sampled, 1, 0.5) == STOP  # same result, sampled: stopped
    assert s._num_stopped == 1  # only the sampled trial counts as stopped
    # The point's result is in the rung, and it goes on to the budget, where every trial ends.
    assert s._brackets[0]._rungs[-1][1] == {"t0": 0.9, "t1": 0.5, "t2": 0.5}
    assert [report(s, poor_point, epoch, 0.5) for epoch in (2, 3)] == [CONTINUE, CONTINUE]
    # At the budget the trial's function ends by itself: no trial is stopped there.
    assert report(s, poor_point, MAX_T, 0.5) == CONTINUE
    assert report(s, poor_sampled, MAX_T, 0.5) == CONTINUE and s._num_stopped == 1


def test_the_points_results_fill_the_rungs_that_judge_sampled_trials():
    s = scheduler(paper_points=2)
    point_a, point_b, sampled = added(s, 0, 1, 2)
    report(s, point_a, 1, 0.9)
    report(s, point_b, 1, 0.8)
    # The cutoff is the rung's median of the points' results (0.85): judged against them.
    assert report(s, sampled, 1, 0.84) == STOP


def test_without_paper_points_every_trial_is_judged():
    s = scheduler(paper_points=0)
    good, first, second = added(s, 0, 1, 2)
    assert report(s, good, 1, 0.9) == CONTINUE
    assert report(s, first, 1, 0.5) == STOP  # trial 1 would be a paper point, but none are
    assert report(s, second, 1, 0.5) == STOP
    assert s._num_stopped == 2


@pytest.mark.parametrize("number", [None, -1])
def test_a_trial_without_a_study_number_is_judged(number):
    s = scheduler(paper_points=8)
    good, odd = added(s, 0, 1)
    odd.config[TRIAL_NUMBER] = number
    report(s, good, 1, 0.9)
    assert report(s, odd, 1, 0.5) == STOP


def test_a_restored_scheduler_makes_the_same_decisions():
    """Tune pickles the scheduler in tuner.pkl and `ASHAState` restores the rungs it saved."""
    s = scheduler(paper_points=1)
    point, good, sampled = added(s, 0, 1, 2)
    report(s, good, 1, 0.9)
    report(s, point, 1, 0.5)
    report(s, good, 2, 0.9)
    state = ASHAState(s).get_state()

    restored = pickle.loads(pickle.dumps(s))
    for bracket in restored._brackets:  # as a scheduler that missed the last results
        for _, recorded in bracket._rungs:
            recorded.clear()
    ASHAState(restored).set_state(pickle.loads(pickle.dumps(state)))
    assert restored.paper_points == 1
    for t in (point, sampled):
        restored.on_trial_add(None, t)
    # The point reports epoch 1 again after its checkpoint (recorded: it goes on), and epoch 2
    # below the rung's cutoff (0.9, restored): a point, it goes on.
    assert report(restored, point, 1, 0.5) == CONTINUE
    assert report(restored, point, 2, 0.4) == CONTINUE
    assert report(restored, sampled, 1, 0.5) == STOP
    assert restored._num_stopped == s._num_stopped + 1


@pytest.mark.parametrize("paper_points, samples, protected", [
    (True, 10, 8), (True, 3, 3), (False, 10, 0)])
def test_the_search_protects_the_points_it_queues(tmp_path, paper_points, samples, protected):
    """The service's tuner: the searcher's first suggestions are the points, numbered from 0,
    and the scheduler protects exactly those (a resume that starts afresh builds the same from
    the saved settings)."""
    from search.service import _new_tuner
    from search.settings import SearchSettings

    settings = SearchSettings(name="points", samples=samples, paper_points=paper_points,
                              storage=str(tmp_path), cache=str(tmp_path))
    config = _new_tuner(settings, None)._local_tuner._tune_config
    s, searcher = config.scheduler, config.search_alg
    assert s.paper_points == protected
    s.set_search_properties(config.metric, config.mode)  # as Tune does when the search starts
    trials = [Trial("trainable", config=searcher.suggest(f"t{i}"), trial_id=f"t{i}", stub=True)
              for i in range(samples)]
    for t in trials:
        s.on_trial_add(None, t)
    rung = settings.grace_period  # the first rung
    report(s, trials[0], rung, 0.9)
    # Each below every result before it: ASHA would stop each one.
    decisions = [report(s, t, rung, 0.8 - 0.01 * i) for i, t in enumerate(trials[1:])]
    assert decisions == [CONTINUE] * (protected - 1) + [STOP] * (samples - max(protected, 1))
