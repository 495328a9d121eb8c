"""The paper's space plus what it lacked: class-sensitive generators, every other loss set
of the registry (`rrr`, `rrr_abs`), a ramp of the classification term, a classifier that sees
only what the gaze-trained mask marks (`mask_gate`), and the project's defaults beside the
paper's recipe (the CC mask loss, the cached heatmap as the gaze target).

`gradient` and `gradcam` depend on the class where guided backprop and deconvnet barely do
(measured on this network); `rrr` and `rrr_abs` (Ross et al. 2017) penalise input gradients
outside the gaze region; gaze-guided counterexamples (`trainable.augment.gaze_counterexamples`)
replace what lies outside the gaze region of the training images, so that it cannot predict the
label, and a consistency term can keep the plain images beside them.
"""

from __future__ import annotations

from spaces.paper import GENERATORS as PAPER_GENERATORS
from spaces.paper import suggest_method, suggest_training
from trainable import loss_sets
from trainable.config import COUNTEREXAMPLE_FILLS

LOSS_SETS = tuple(loss_sets.LOSS_SETS)  # every loss set: the paper's, rrr and rrr_abs
GENERATORS = PAPER_GENERATORS + ("gradient", "gradcam")
SEG_LOSSES = ("cc", "bce")
GAZE_TARGETS = ("heatmap", "reference")
COUNTEREXAMPLES = ("none", *COUNTEREXAMPLE_FILLS)
# Another single image's outline is left out: it swaps away the image's own findings that lie
# outside it (the synthetic shortcut benchmark's screen, one seed, clean release: test AUC 0.795
# against 0.855 with the batch's outline).
OUTLINES = ("own", "batch")
# Epochs of the classification term's ramp: none, or over the one or two epochs in which the
# gaze benchmark's shortcut is learnt.
CLS_RAMPS = (0.0, 1.0, 2.0)
# Where the gaze-trained mask gates the classifier (`trainable.model.MaskGatedUnet`).
MASK_GATES = ("none", "pool", "input")
CONSISTENCY_WEIGHTS = (0.0, 10.0)  # 10: the best of 3, 10 and 30 in that screen's validation


def extended(trial) -> None:
    """The paper's space with two more generators, the `rrr` and `rrr_abs` loss sets, both mask
    losses and gaze targets, a ramp of the classification term, a classifier gated by the
    gaze-trained mask, and gaze-guided counterexamples."""
    loss_set = suggest_method(trial, LOSS_SETS, GENERATORS)
    if loss_sets.applies("seg_loss", loss_set):
        trial.suggest_categorical("seg_loss", SEG_LOSSES)
    if loss_sets.applies("gaze_target", loss_set):
        trial.suggest_categorical("gaze_target", GAZE_TARGETS)
    if loss_sets.applies("rrr_lambda", loss_set):
        trial.suggest_float("rrr_lambda", 0.1, 100.0, log=True)
    if loss_sets.applies("cls_ramp", loss_set):
        trial.suggest_categorical("cls_ramp", CLS_RAMPS)
    if loss_sets.applies("mask_gate", loss_set):
        trial.suggest_categorical("mask_gate", MASK_GATES)
    # Input-side: every loss set can train on counterexamples (none keeps the images), whose
    # kept region is the image's own gaze region or the batch's (whose outline cannot tell the
    # class), with or without the consistency term that keeps the plain images in training.
    if trial.suggest_categorical("counterexample", COUNTEREXAMPLES) != "none":
        trial.suggest_categorical("counterexample_outline", OUTLINES)
        trial.suggest_categorical("counterexample_consistency", CONSISTENCY_WEIGHTS)
    suggest_training(trial)
