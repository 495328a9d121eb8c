"""The loss sets: one registry of what each set adds to the classification loss and what it needs.

Every module that depends on the loss set reads these facts instead of keeping its own list:
the config's choices (`trainable.config`), the terms and their weighting (`trainable.losses`),
which map a training step computes (`trainable.loop.compute_terms`), the network
(`trainable.model.build_model`), the search spaces (`spaces`) and the benchmarks. Pure Python,
so the search's driver reads it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossSet:
    """One loss set: its terms beside "cls" (`trainable.losses`) and what computing them needs."""

    name: str
    meaning: str  # one line
    terms: tuple[str, ...]  # the named terms added to "cls" (`trainable.losses.loss_terms`)
    uses_map: bool  # computes a saliency map with the generator
    trains_through_map: bool  # the map is differentiable w.r.t. the weights (create_graph)
    uses_mask: bool  # the loss needs the U-Net decoder's mask
    decoder: bool  # the network is the U-Net (mask and logits); False: encoder and head only
    # The differentiable input gradient whose energy outside the gaze a penalty takes: "map"
    # (rrr: of the constrained outputs' logits, in the eval-mode map pass), "log_probs"
    # (rrr_abs: of the summed log-probabilities of every output, through the training forward
    # itself), or None.
    input_gradient: str | None
    keys: tuple[str, ...]  # the TrialConfig keys that apply to it beyond the shared ones

    def __post_init__(self):
        if self.trains_through_map and not self.uses_map:
            raise ValueError(f"loss set {self.name!r}: trains through a map it does not compute")
        if self.uses_mask and not self.decoder:
            raise ValueError(f"loss set {self.name!r}: needs a mask but has no decoder")
        if self.input_gradient not in (None, "map", "log_probs"):
            raise ValueError(f"loss set {self.name!r}: unknown input gradient "
                             f"{self.input_gradient!r}")
        if self.uses_map != ("generator" in self.keys):
            raise ValueError(f"loss set {self.name!r}: the generator key applies exactly when "
                             f"a map is computed")


LOSS_SETS: dict[str, LossSet] = {s.name: s for s in (
    LossSet("classifier", "classification only: the U-Net's encoder and head, no decoder",
            terms=(), uses_map=False, trains_through_map=False, uses_mask=False,
            decoder=False, input_gradient=None, keys=()),
    LossSet("baseline", "the decoder's mask is trained towards the gaze heatmap",
            terms=("mask_gaze",), uses_map=False, trains_through_map=False, uses_mask=True,
            decoder=True, input_gradient=None,
            keys=("loss_weight", "seg_loss", "gaze_target", "cls_ramp", "mask_gate")),
    LossSet("set1", "the generator's map is trained towards the gaze heatmap",
            terms=("map_gaze",), uses_map=True, trains_through_map=True, uses_mask=False,
            decoder=True, input_gradient=None,
            keys=("generator", "loss_weight", "gaze_target", "map_outputs", "cls_ramp")),
    LossSet("set2", "the decoder's mask is trained towards the generator's map (a fixed target)",
            terms=("mask_map",), uses_map=True, trains_through_map=False, uses_mask=True,
            decoder=True, input_gradient=None,
            keys=("generator", "loss_weight", "seg_loss", "cls_ramp")),
    LossSet("set3", "r * baseline's mask term + (1 - r) * set1's map term",
            terms=("mask_gaze", "map_gaze"), uses_map=True, trains_through_map=True,
            uses_mask=True, decoder=True, input_gradient=None,
            keys=("generator", "r", "loss_weight", "seg_loss", "gaze_target", "map_outputs",
                  "cls_ramp", "mask_gate")),
    LossSet("rrr", "right for the right reasons: input-gradient energy outside the gaze",
            terms=("rrr",), uses_map=False, trains_through_map=False, uses_mask=False,
            decoder=True, input_gradient="map", keys=("rrr_lambda", "map_outputs", "cls_ramp")),
    LossSet("rrr_abs", "Ross et al.'s right for the right reasons: squared input gradient of "
            "the summed log-probabilities outside the gaze, in the training forward",
            terms=("rrr_abs",), uses_map=False, trains_through_map=False, uses_mask=False,
            decoder=True, input_gradient="log_probs", keys=("rrr_lambda", "cls_ramp")),
)}

# The keys that apply to some loss sets only; every other config key applies to all of them.
SET_KEYS = frozenset(k for s in LOSS_SETS.values() for k in s.keys)


def applies(key: str, loss_set: str) -> bool:
    """Whether config `key` matters to the training of a `loss_set` trial.

    Every shared key does; a set-specific key (`SET_KEYS`: generator, r, loss_weight,
    rrr_lambda, seg_loss, gaze_target, map_outputs, cls_ramp, mask_gate) only for the sets that
    list it: no generator for classifier, baseline and rrr, `r` only for set3, `seg_loss` where a
    mask is trained (baseline, set2, set3), `gaze_target` where the gaze heatmap is a loss's
    target (baseline, set1, set3; rrr and rrr_abs only threshold it into a region),
    `map_outputs` where a map of chosen outputs is constrained (set1, set3, rrr; rrr_abs takes
    every output's),
    `cls_ramp` wherever a term beside the classification's is trained (all but classifier),
    `mask_gate` where the mask is trained towards the gaze (baseline, set3).
    (`generator` still names the map that `val/map/*` and the figures measure for every set.)

    Raises:
        KeyError: an unknown loss set.
    """
    if loss_set not in LOSS_SETS:
        raise KeyError(f"unknown loss set {loss_set!r}; valid: {', '.join(LOSS_SETS)}")
    return key not in SET_KEYS or key in LOSS_SETS[loss_set].keys
