"""The searcher tells Optuna the truth: trials stopped before the budget are PRUNED."""

import pickle

import optuna
import pytest
from helpers import paper_part
from optuna.trial import TrialState

from search.searcher import PruningAwareOptunaSearch, load_study, tpe_sampler
from spaces import PAPER_POINTS, SPACES
from spaces.paper import RECIPE

METRIC = "val/auc/mean"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_searcher(max_t=3, **kwargs):
    return PruningAwareOptunaSearch(space=SPACES["paper"], metric=METRIC, mode="max",
                                    sampler=tpe_sampler(0), max_t=max_t, **kwargs)


def run(searcher, trial_id, values, reported_last=True):
    """Drive one trial as Ray does: results while it runs, then completion.

    When the scheduler stops a trial, Ray passes that last result to on_trial_complete only
    (reported_last=False); a trial that continues gets each result through on_trial_result.
    """
    config = searcher.suggest(trial_id)
    results = [{METRIC: v, "training_iteration": i + 1} for i, v in enumerate(values)]
    for result in results if reported_last else results[:-1]:
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result=results[-1])
    return config


def sampled(config: dict) -> dict:
    """A suggested config without the trial's number (which is not a sampled parameter)."""
    return {k: v for k, v in config.items() if k != "trial_number"}


def states(study):
    return [(t.state, t.value, t.intermediate_values) for t in study.trials]


def test_stopped_early_is_pruned_and_full_budget_is_complete():
    searcher = make_searcher(max_t=3)
    run(searcher, "full", [0.6, 0.7, 0.8], reported_last=False)  # ASHA stops at max_t
    run(searcher, "stopped", [0.55, 0.5], reported_last=False)  # ASHA stops at a rung
    run(searcher, "quit", [0.65], reported_last=True)
    assert states(searcher.study) == [
        (TrialState.COMPLETE, 0.8, {1: 0.6, 2: 0.7, 3: 0.8}),
        (TrialState.PRUNED, 0.5, {1: 0.55, 2: 0.5}),
        (TrialState.PRUNED, 0.65, {1: 0.65}),
    ]


def test_a_complete_trial_is_worth_its_best_epoch_and_carries_its_number():
    searcher = make_searcher(max_t=3)
    first = run(searcher, "peaks-early", [0.6, 0.9, 0.8], reported_last=False)
    second = run(searcher, "nan", [float("nan")] * 3, reported_last=False)
    assert states(searcher.study)[0][:2] == (TrialState.COMPLETE, 0.9)  # the checkpoint's epoch
    assert searcher.study.trials[1].state == TrialState.FAIL  # no epoch had a score
    assert (first["trial_number"], second["trial_number"]) == (0, 1)


def test_plain_optuna_search_would_have_called_it_complete():
    # The reason the subclass exists (Ray's own integration, same calls).
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=SPACES["paper"], metric=METRIC, mode="max",
                            sampler=tpe_sampler(0))
    run(searcher, "stopped", [0.55, 0.5], reported_last=False)
    assert searcher._ot_study.trials[0].state == TrialState.COMPLETE


def test_errors_fail_and_repeated_completions_are_ignored():
    searcher = make_searcher()
    searcher.suggest("crash")
    searcher.on_trial_result("crash", {METRIC: 0.6, "training_iteration": 1})
    searcher.on_trial_complete("crash", error=True)  # what Ray sends after the last retry
    run(searcher, "twice", [0.6], reported_last=False)
    searcher.on_trial_complete("twice", result={METRIC: 0.9, "training_iteration": 3})
    assert [t.state for t in searcher.study.trials] == [TrialState.FAIL, TrialState.PRUNED]
    assert searcher.study.trials[1].value == 0.6


def test_pruned_trials_keep_their_value_out_of_best():
    searcher = make_searcher(max_t=2)
    run(searcher, "short", [0.99], reported_last=False)
    run(searcher, "long", [0.6, 0.7], reported_last=False)
    assert searcher.study.best_trial.value == 0.7


def test_state_survives_pickling_like_tune_saves_it(tmp_path):
    searcher = make_searcher()
    run(searcher, "a", [0.6], reported_last=False)
    pending = searcher.suggest("b")  # running when the driver went away
    searcher.save_to_dir(str(tmp_path), session_str="s1")
    restored = PruningAwareOptunaSearch()
    restored.restore_from_dir(str(tmp_path))
    searcher.on_trial_result("b", {METRIC: 0.7, "training_iteration": 1})
    restored.on_trial_result("b", {METRIC: 0.7, "training_iteration": 1})
    restored.on_trial_complete("b", result={METRIC: 0.75, "training_iteration": 2})
    assert [t.state for t in restored.study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    # Optuna keeps what the space suggested; the config adds the space's constants
    assert {**restored.study.trials[1].params, **RECIPE} == sampled(pending)
    assert [t.state for t in load_study(tmp_path).trials] == [TrialState.PRUNED,
                                                              TrialState.RUNNING]
    pickle.dumps(restored)


def test_paper_points_come_first_and_then_tpe_samples():
    searcher = make_searcher(points_to_evaluate=PAPER_POINTS)
    configs = [searcher.suggest(f"t{i}") for i in range(len(PAPER_POINTS) + 2)]
    assert [sampled(c) for c in configs[: len(PAPER_POINTS)]] == [
        # the paper's space asks for none of the extended space's keys
        {**paper_part(point), **RECIPE} for point in PAPER_POINTS]
    assert all(c["loss_set"] in ("classifier", "baseline", "set1", "set2", "set3")
               for c in configs[len(PAPER_POINTS):])


def test_same_seed_same_suggestions():
    first = [make_searcher().suggest(f"t{i}") for i in range(3)]
    again = [make_searcher().suggest(f"t{i}") for i in range(3)]
    assert first == again


@pytest.mark.slow
def test_under_ray_tune_asha_stops_reach_optuna_as_pruned(tmp_path):
    """A real Tuner + ASHA over a stand-in trainable whose score is set by the learning rate."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    def trainable(config):
        for epoch in range(1, 5):
            tune.report({METRIC: min(1.0, config["lr"] * 100) + 0.01 * epoch})

    searcher = make_searcher(max_t=4)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", search_alg=searcher, num_samples=8,
                scheduler=ASHAScheduler(max_t=4, grace_period=1, reduction_factor=2),
                max_concurrent_trials=2),
            run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path), verbose=0),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    study = load_study(tmp_path / "asha")
    iterations = {r.config["lr"]: r.metrics["training_iteration"] for r in grid}
    by_lr = {t.params["lr"]: t for t in study.trials}
    assert len(study.trials) == 8 and set(iterations) == set(by_lr)
    for lr, trial in by_lr.items():
        expected = TrialState.COMPLETE if iterations[lr] == 4 else TrialState.PRUNED
        assert trial.state == expected
        assert max(trial.intermediate_values) == iterations[lr]
    assert any(t.state == TrialState.PRUNED for t in study.trials)
