"""The search spaces: the right parameters on each branch, every sample a valid trial config."""

import optuna
import pytest
from helpers import paper_part

import spaces
from spaces import PAPER_POINTS, SPACES, get_space, sample
from spaces.extended import GENERATORS as EXTENDED_GENERATORS
from trainable.config import TrialConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHARED = {"lr": 1e-3, "dropout": 0.1}
PAPER_RECIPE = {"seg_loss": "bce", "gaze_target": "reference"}


@pytest.mark.parametrize(
    ("params", "keys"),
    [
        ({"loss_set": "classifier"}, set()),
        ({"loss_set": "baseline", "loss_weight": 2.0}, {"loss_weight"}),
        ({"loss_set": "set1", "generator": "guided_backprop", "loss_weight": 1.0},
         {"generator", "loss_weight"}),
        ({"loss_set": "set2", "generator": "deconvnet", "loss_weight": 0.5},
         {"generator", "loss_weight"}),
        ({"loss_set": "set3", "generator": "deconvnet", "r": 0.25, "loss_weight": 1.0},
         {"generator", "r", "loss_weight"}),
    ],
)
def test_paper_space_suggests_only_what_the_branch_uses(params, keys):
    trial = optuna.trial.FixedTrial({**params, **SHARED})
    config = sample(SPACES["paper"], trial)
    assert set(trial.params) == {"loss_set", "lr", "dropout"} | keys
    # the paper's recipe: constants of the space, never sampled
    assert config == {**params, **SHARED, **PAPER_RECIPE}
    TrialConfig.from_dict(config)


def test_extended_space_adds_generators_rrr_and_counterexamples():
    swap = {"counterexample": "swap", "counterexample_outline": "batch",
            "counterexample_consistency": 10.0}
    rrr = sample(SPACES["extended"], optuna.trial.FixedTrial(
        {"loss_set": "rrr", "rrr_lambda": 5.0, "cls_ramp": 2.0, **swap, **SHARED}))
    assert rrr == {"loss_set": "rrr", "rrr_lambda": 5.0, "cls_ramp": 2.0, **swap, **SHARED}
    TrialConfig.from_dict(rrr)
    for generator in ("gradient", "gradcam"):
        params = {"loss_set": "set1", "generator": generator, "loss_weight": 1.0,
                  "gaze_target": "heatmap", "cls_ramp": 0.0, "counterexample": "none",
                  **SHARED}
        assert sample(SPACES["extended"], optuna.trial.FixedTrial(params)) == params
    # the project's defaults beside the paper's recipe
    params = {"loss_set": "baseline", "loss_weight": 1.0, "seg_loss": "cc",
              "gaze_target": "heatmap", "cls_ramp": 1.0, "mask_gate": "input",
              "counterexample": "blur",
              "counterexample_outline": "own", "counterexample_consistency": 0.0, **SHARED}
    assert sample(SPACES["extended"], optuna.trial.FixedTrial(params)) == params


def test_paper_space_refuses_what_only_extended_offers():
    with pytest.raises(ValueError):  # not among the paper's choices
        sample(SPACES["paper"], optuna.trial.FixedTrial({"loss_set": "rrr", **SHARED}))
    with pytest.raises(ValueError):
        sample(SPACES["paper"], optuna.trial.FixedTrial(
            {"loss_set": "set1", "generator": "gradcam", "loss_weight": 1.0, **SHARED}))


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_sampled_config_is_a_valid_trial_config(name):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(300):
        trial = study.ask()
        config = sample(get_space(name), trial)
        cfg = TrialConfig.from_dict(config)
        assert 1e-5 <= cfg.lr <= 1e-2 and 0 <= cfg.dropout <= 0.5 and 0 <= cfg.r <= 1
        seen.add((config["loss_set"], config.get("generator")))
        study.tell(trial, 0.5)
    # every branch of the space was reached
    n_generators = 2 if name == "paper" else len(EXTENDED_GENERATORS)
    n_without = 2 if name == "paper" else 4  # classifier, baseline (and rrr, rrr_abs)
    assert len(seen) == 3 * n_generators + n_without


@pytest.mark.parametrize("name", sorted(SPACES))
def test_paper_points_are_the_eight_configurations_and_fit_each_space(name):
    assert len(PAPER_POINTS) == 8
    assert {(p["loss_set"], p.get("generator")) for p in PAPER_POINTS} == {
        ("baseline", None), ("classifier", None),
        *((s, g) for s in ("set1", "set2", "set3") for g in ("guided_backprop", "deconvnet")),
    }
    for point in PAPER_POINTS:
        # a point names every parameter its branch suggests, so nothing is sampled; in the
        # paper's space the recipe it names is the space's constant
        assert sample(get_space(name), optuna.trial.FixedTrial(point)) == (
            {**paper_part(point), **PAPER_RECIPE} if name == "paper" else point)
        cfg = TrialConfig.from_dict(point)
        # the paper's mask loss and gaze target, wherever the loss set uses them
        assert (point.get("seg_loss"), point.get("gaze_target")) == {
            "classifier": (None, None), "baseline": ("bce", "reference"),
            "set1": (None, "reference"), "set2": ("bce", None), "set3": ("bce", "reference"),
        }[cfg.loss_set]


def test_paper_points_are_queued_first_by_optuna():
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for point in PAPER_POINTS:
        study.enqueue_trial(point)
    for point in PAPER_POINTS:
        assert sample(SPACES["paper"], study.ask()) == {**paper_part(point), **PAPER_RECIPE}


def test_get_space_names_the_valid_spaces():
    assert get_space("paper") is spaces.SPACES["paper"]
    with pytest.raises(KeyError, match="paper, extended"):
        get_space("papr")
