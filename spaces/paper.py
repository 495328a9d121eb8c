"""The paper's space: Watanabe et al. (2022)'s loss sets and heatmap generators, tuned.

Define-by-run (Optuna): a parameter exists only on the branch that uses it (a generator only for
the sets that compute a map, `r` only for Set 3: `trainable.loss_sets.applies`), so TPE never
models values that did nothing. The number of epochs is the scheduler's budget
(`--max-epochs`), not a parameter here.

The paper's recipe is a constant of its space (`RECIPE`, returned by `paper`, which Ray's
Optuna searcher adds to every trial's config): the mask trained with BCE-with-logits
(`seg_loss=bce`) against the dataset authors' rendering of the gaze heatmap
(`gaze_target=reference`). A `--set` of either is refused (the space's constant would win);
the extended space searches both choices of each.
"""

from __future__ import annotations

from trainable.loss_sets import applies

# The paper's choices.
LOSS_SETS = ("classifier", "baseline", "set1", "set2", "set3")
GENERATORS = ("guided_backprop", "deconvnet")
RECIPE = {"seg_loss": "bce", "gaze_target": "reference"}


def paper(trial) -> dict:
    """Loss set x generator x Set-3 ratio x learning rate x dropout (the paper's search), with
    the paper's mask loss and gaze target."""
    suggest_method(trial, LOSS_SETS, GENERATORS)
    suggest_training(trial)
    return dict(RECIPE)


def suggest_method(trial, loss_sets, generators) -> str:
    """Suggest the loss set and the parameters that only its branch uses."""
    loss_set = trial.suggest_categorical("loss_set", loss_sets)
    if applies("generator", loss_set):
        trial.suggest_categorical("generator", generators)
    if applies("r", loss_set):
        trial.suggest_float("r", 0.0, 1.0)
    if applies("loss_weight", loss_set):  # scales a heatmap term against classification
        trial.suggest_float("loss_weight", 0.1, 10.0, log=True)
    return loss_set


def suggest_training(trial) -> None:
    """Suggest the optimisation settings every loss set shares."""
    trial.suggest_float("lr", 1e-5, 1e-2, log=True)
    trial.suggest_float("dropout", 0.0, 0.5)


def _paper_point(loss_set: str, generator: str | None = None) -> dict:
    # The paper publishes its method choices but not its learning rate, dropout or ratio, so the
    # eight points share one setting (the trainable's defaults, the dataset authors' dropout):
    # they then differ only in the method, as the paper's table does.
    point = {"loss_set": loss_set, "lr": 1e-3, "dropout": 0.5}
    if generator:
        point["generator"] = generator
    if applies("r", loss_set):
        point["r"] = 0.5
    if applies("loss_weight", loss_set):
        point["loss_weight"] = 1.0
    # The recipe too, where the set uses it, the paper's plain training images and constant
    # classification weight: a point then fits the extended space, which searches these keys,
    # as it fits the paper's (which suggests neither counterexample nor ramp: Optuna ignores a
    # queued key the space does not ask for).
    point.update({k: v for k, v in RECIPE.items() if applies(k, loss_set)})
    point["counterexample"] = "none"
    if applies("cls_ramp", loss_set):  # the paper weighs every term alike from the first step
        point["cls_ramp"] = 0.0
    if applies("mask_gate", loss_set):  # and its classifier pools the features uniformly
        point["mask_gate"] = "none"
    return point


# The eight configurations of Watanabe et al. (2022), queued first with `--paper-points`.
PAPER_POINTS = [
    _paper_point("baseline"),
    _paper_point("classifier"),
    *(_paper_point(s, g) for s in ("set1", "set2", "set3") for g in GENERATORS),
]
