"""The loss sets: pure functions of tensors that return named terms.

Notation: cls = BCE-with-logits on the 3 labels; M = the decoder's mask
logits; G = the generator's saliency map; E = the static eye-gaze heatmap. Every map-vs-map term
is `map_alignment`, 1 - Pearson CC, so that Set 3's ratio r mixes comparable quantities.

| loss set   | total                                              |
| ---------- | -------------------------------------------------- |
| classifier | cls                                                |
| baseline   | cls + weight * mask_gaze                           |
| set1       | cls + weight * map_gaze                            |
| set2       | cls + weight * mask_map      (G is the target)     |
| set3       | cls + weight * (r * mask_gaze + (1 - r) * map_gaze) |
| rrr        | cls + rrr_lambda * rrr                             |
| rrr_abs    | cls + rrr_lambda * scale * rrr_abs                 |

with mask_gaze = L(sigmoid(M), E), map_gaze = L(G, E), mask_map = L(sigmoid(M), G.detach()),
and `scale` the ratio of the two terms' parameter gradients at initialisation
(`trainable.loop.measure_rrr_scale`).
Each set's terms and what they need are in the registry, `trainable.loss_sets.LOSS_SETS`.

The paper's recipe is available beside these defaults: `seg_loss="bce"` trains the mask terms
with BCE-with-logits (`mask_loss`), `reference_gaze_target` renders E as the dataset authors'
target, and G may hold the maps of every class's output (`map_outputs=all`, stacked by
`trainable.loop.compute_terms`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from trainable import loss_sets

# Added to variances, so that a constant map has CC 0 instead of 0/0; the maps are scaled to a
# maximum of 1 first, so it is small against any map that is not constant.
_VAR_EPS = 1e-8
# A floor for the per-image maximum, not "+ eps": a map of 1e-16 (a fresh EfficientNet in eval
# mode) must still reach a maximum of 1, while 1 / floor times the loss's own gradient stays
# finite in float32 for a map of zeros (a smaller floor such as finfo.tiny overflows to inf).
_PEAK_FLOOR = 1e-30


def classification(logits: Tensor, labels: Tensor) -> Tensor:
    """BCE-with-logits on one-hot labels, mean over images and classes.

    Shape:
        logits [B, K], labels [B, K] (float, one-hot) -> scalar.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def normalise_map(s: Tensor) -> Tensor:
    """A map as a non-negative per-pixel magnitude with a per-image maximum of 1, in float32.

    |s| summed over channels: the gaze heatmap says where the radiologist looked, not the sign
    of the evidence, and a map of a 3-channel input has one magnitude per pixel. The maximum is
    detached: the alignment below is already scale-invariant, so the maximum only brings maps of
    any size (1e-16 from a fresh network in eval mode, 1e3 later) to unit scale where a fixed
    epsilon means something; its gradient would all land on one pixel.

    Shape:
        s [B, C, H, W] -> [B, 1, H, W].
    """
    magnitude = s.float().abs().sum(1, keepdim=True)
    peak = magnitude.detach().amax((2, 3), keepdim=True)
    return magnitude / peak.clamp_min(_PEAK_FLOOR)


def map_alignment(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over images of 1 - Pearson CC between two normalised maps; in [0, 2].

    Why this loss: it is invariant to the scale and shift of each map, and bounded. The raw
    scale of a saliency map means nothing (it follows the logits and changes by orders of
    magnitude during training): MSE on raw maps grew x1e6 when the map grew x1e3, so its weight
    against cls could not be tuned. Min-max scaling + BCE puts half its gradient on the two
    pixels that set the minimum and maximum. CC weighs every pixel by its deviation and is what
    the gaze literature reports. Both Set-3 terms use it, so r mixes comparable quantities.

    Computed in float32 whatever the inputs' dtype (defined under bf16 autocast); a constant
    map gives CC 0 (loss 1) with finite gradients instead of NaN.

    Args:
        pred: a signed saliency map [B, C, H, W] or a probability mask [B, 1, H, W].
        target: the gaze heatmap [B, 1, H, W] (or a map, for set2), same H and W.

    Shape:
        pred [B, C, H, W], target [B, C', H, W] -> scalar.
    """
    if pred.shape[0] != target.shape[0] or pred.shape[2:] != target.shape[2:]:
        raise ValueError(
            f"map_alignment: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ "
            "in batch or spatial size"
        )
    with torch.autocast(pred.device.type, enabled=False):
        p = _centred(normalise_map(pred))
        t = _centred(normalise_map(target))
        cov = (p * t).mean((1, 2, 3))
        # eps inside the square roots: sqrt has an infinite slope at 0 (a constant map).
        std_p = (p.square().mean((1, 2, 3)) + _VAR_EPS).sqrt()
        std_t = (t.square().mean((1, 2, 3)) + _VAR_EPS).sqrt()
        return (1 - cov / (std_p * std_t)).mean()


def _centred(m: Tensor) -> Tensor:
    return m - m.mean((1, 2, 3), keepdim=True)


def mask_loss(mask_logits: Tensor, target: Tensor, seg_loss: str = "cc") -> Tensor:
    """The decoder mask's loss against a target map: "cc" or the paper's "bce".

    "cc": `map_alignment` of sigmoid(M). "bce": BCE-with-logits of M against the target as it
    is (values in [0, 1]; not rescaled, so the reference target keeps its grey levels), the
    mean over pixels and images, as the paper and the dataset authors' U-Net train the mask.
    In float32, also under bf16 autocast.

    Shape:
        mask_logits [B, 1, H, W], target [B, 1, H, W] -> scalar.
    """
    if seg_loss == "cc":
        return map_alignment(torch.sigmoid(mask_logits.float()), target)
    if seg_loss != "bce":
        raise ValueError(f"seg_loss: {seg_loss!r} is not one of cc, bce")
    with torch.autocast(mask_logits.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(mask_logits.float(), target.float())


def reference_gaze_target(gaze: Tensor) -> Tensor:
    """The cached heatmap rendered as the dataset authors' training target (`gaze_target=
    reference`): viridis, 8-bit, then PIL's grey, `trainable.data.heatmaps.
    reference_rendering_lut`.

    Why a transform of the cached heatmap is their target: both start from the same min-max
    scaled heatmap, and the rendering is a per-pixel table lookup, so at the same resolution
    this is their PNG-and-grey pipeline bit for bit. They render at full DICOM resolution and
    then resize to 224 px; the cache resizes first. Resizing (a local average) and the smooth,
    monotone colour table nearly commute on a map blurred over about 11 output pixels
    (sigma 150 original pixels), so the two differ by far less than the 1/255 steps of the PNG.

    Shape:
        gaze [B, 1, H, W] in [0, 1] -> [B, 1, H, W] in [30/255, 215/255], float32.
    """
    lut = torch.from_numpy(_reference_lut()).to(gaze.device)
    levels = (gaze.detach().float() * 256).long().clamp(0, 255)  # matplotlib's binning
    return lut[levels]


@functools.cache
def _reference_lut():
    from trainable.data.heatmaps import reference_rendering_lut

    return reference_rendering_lut()


def gaze_per_map(gaze: Tensor, maps: Tensor) -> Tensor:
    """The gaze heatmap of each map: with `map_outputs=all` the maps of the K outputs are
    stacked class-major ([K * B], see `trainable.loop.compute_terms`), so E is tiled K times.

    Shape:
        gaze [B, 1, H, W], maps [K * B, C, H, W] -> [K * B, 1, H, W].
    """
    times, rest = divmod(maps.shape[0], gaze.shape[0])
    if rest or times == 0:
        raise ValueError(f"{maps.shape[0]} maps for {gaze.shape[0]} gaze heatmaps: expected a "
                         f"multiple (one map per image and output)")
    return gaze.repeat(times, 1, 1, 1) if times > 1 else gaze


def rrr_penalty(input_grad: Tensor, gaze: Tensor, threshold: float = 0.1) -> Tensor:
    """"Right for the right reasons" (Ross et al. 2017): input-gradient energy outside the gaze.

    The region is where the gaze heatmap reaches `threshold` of its per-image maximum. Ross et
    al. penalise the squared gradient outside the region, a quantity whose scale follows the
    network (it changes by orders of magnitude during training and between encoders), so a
    fixed lambda would mean something different at every step, and the penalty could be
    lowered by shrinking the gradient everywhere instead of moving it. Here the penalty is the
    *fraction* of the gradient energy that lies outside the region, in [0, 1]: scale-invariant,
    lowered only by moving attribution into the region. A heatmap of zeros gives no region to
    leave, so no penalty.

    Shape:
        input_grad [B, C, H, W], gaze [B, 1, H, W] -> scalar.
    """
    outside = _outside_gaze("rrr_penalty", input_grad, gaze, threshold)
    with torch.autocast(input_grad.device.type, enabled=False):
        g = input_grad.float()
        # Scaled by the detached maximum before squaring, so tiny gradients do not underflow.
        peak = g.detach().abs().amax((1, 2, 3), keepdim=True)
        energy = (g / peak.clamp_min(_PEAK_FLOOR)).square().sum(1)
        fraction = (energy * outside).sum((1, 2)) / (energy.sum((1, 2)) + _VAR_EPS)
        return fraction.mean()


def rrr_abs_penalty(input_grad: Tensor, gaze: Tensor, threshold: float = 0.1) -> Tensor:
    """Ross et al.'s (2017) penalty as published: the squared input gradient outside the gaze
    region, summed over pixels and channels, averaged over images.

    The region is `rrr_penalty`'s. Unlike that fraction it cannot be lowered by inflating the
    gradient inside the region, only by removing it outside; its scale follows the network, so
    the loop weighs it in units of its gradient ratio at initialisation
    (`trainable.loop.measure_rrr_scale`).

    Shape:
        input_grad [B, C, H, W], gaze [B, 1, H, W] -> scalar.
    """
    outside = _outside_gaze("rrr_abs_penalty", input_grad, gaze, threshold)
    with torch.autocast(input_grad.device.type, enabled=False):
        energy = input_grad.float().square().sum(1)
        return (energy * outside).sum((1, 2)).mean()


def _outside_gaze(caller: str, input_grad: Tensor, gaze: Tensor, threshold: float) -> Tensor:
    """The rrr penalties' region, inverted: where the gaze heatmap stays below `threshold` of
    its per-image maximum (a heatmap of zeros has no region to leave: nothing is outside).

    Shape:
        input_grad [B, C, H, W], gaze [B, 1, H, W] -> bool [B, H, W].
    """
    if input_grad.shape[0] != gaze.shape[0] or input_grad.shape[2:] != gaze.shape[2:]:
        raise ValueError(
            f"{caller}: input_grad {tuple(input_grad.shape)} and gaze {tuple(gaze.shape)} "
            "differ in batch or spatial size"
        )
    gaze = gaze.float().sum(1)
    return gaze < threshold * gaze.amax((1, 2), keepdim=True)


def consistency(logits: Tensor, other: Tensor) -> Tensor:
    """Jensen-Shannon divergence between the class probabilities of two views of each image,
    per class (the outputs are independent sigmoids, each a Bernoulli), averaged; in nats,
    bounded by log 2. Symmetric and finite where one view saturates, unlike a KL or a logit
    difference, so that neither view can escape it by growing its logits.

    Shape:
        logits, other: [B, K] -> scalar.
    """
    log_p = torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)])  # [2, B, K]
    log_q = torch.stack([F.logsigmoid(other), F.logsigmoid(-other)])
    p, q = log_p.exp(), log_q.exp()
    log_m = ((p + q) / 2).clamp_min(1e-12).log()
    kl = (p * (log_p - log_m)).sum(0) + (q * (log_q - log_m)).sum(0)
    return kl.mean() / 2


def loss_terms(loss_set: str, *, logits: Tensor, labels: Tensor,
               mask_logits: Tensor | None = None, gen_map: Tensor | None = None,
               gaze: Tensor | None = None, input_grad: Tensor | None = None, r: float = 0.5,
               weight: float = 1.0, rrr_lambda: float = 10.0,
               seg_loss: str = "cc") -> dict[str, Tensor]:
    """The named terms of a loss set and their weighted "total".

    Args:
        loss_set: a key of `trainable.loss_sets.LOSS_SETS`.
        logits: class logits [B, 3]; labels: one-hot float [B, 3].
        mask_logits: the decoder's mask logits M [B, 1, H, W] (baseline, set2, set3).
        gen_map: the generator map G [B, C, H, W] (set1, set3 differentiable; set2 any); for
            set1/set3 also [K * B, C, H, W], the maps of K outputs (`gaze_per_map`).
        gaze: the gaze heatmap E [B, 1, H, W] (all but classifier and set2).
        input_grad: the plain input gradient, differentiable (rrr, rrr_abs); [B, C, H, W], or
            [K * B, C, H, W] as gen_map (rrr).
        r: set3's share of the mask term.
        weight: weight of the heatmap terms against cls.
        rrr_lambda: weight of the rrr or rrr_abs term (for rrr_abs the loop passes it
            times the term's gradient ratio at initialisation).
        seg_loss: the mask terms' loss, "cc" or "bce" (`mask_loss`).

    Returns:
        {"cls": ..., <the set's terms>..., "total": ...}, scalar tensors.
    """
    if loss_set not in loss_sets.LOSS_SETS:
        raise KeyError(f"unknown loss set {loss_set!r}; valid: {', '.join(loss_sets.LOSS_SETS)}")

    def need(name: str, value: Tensor | None) -> Tensor:
        if value is None:
            raise ValueError(f"loss set {loss_set!r} needs {name}=")
        return value

    spec = loss_sets.LOSS_SETS[loss_set]
    terms = {"cls": classification(logits, labels)}
    for term in spec.terms:
        if term == "mask_gaze":
            terms[term] = mask_loss(need("mask_logits", mask_logits), need("gaze", gaze),
                                    seg_loss)
        elif term == "map_gaze":
            g = need("gen_map", gen_map)
            terms[term] = map_alignment(g, gaze_per_map(need("gaze", gaze), g))
        elif term == "mask_map":
            # The map is the target: Set 2 trains the decoder towards it, not the map. As
            # |G| / max |G| in [0, 1], a target BCE can take (CC is invariant to the scaling).
            target = normalise_map(need("gen_map", gen_map).detach())
            terms[term] = mask_loss(need("mask_logits", mask_logits), target, seg_loss)
        else:
            g = need("input_grad", input_grad)
            penalty = rrr_abs_penalty if term == "rrr_abs" else rrr_penalty
            terms[term] = penalty(g, gaze_per_map(need("gaze", gaze), g))

    terms["total"] = terms["cls"] + _heatmap_loss(spec, terms, r, weight, rrr_lambda)
    return terms


def _heatmap_loss(spec: loss_sets.LossSet, terms: dict[str, Tensor], r: float, weight: float,
                  rrr_lambda: float) -> Tensor | float:
    if "r" in spec.keys:  # set3: r shares the weight between the mask and the map term
        return weight * (r * terms["mask_gaze"] + (1 - r) * terms["map_gaze"])
    if spec.input_gradient:  # rrr, rrr_abs: weighted by their own lambda
        return rrr_lambda * terms[spec.terms[0]]
    return weight * sum(terms[name] for name in spec.terms)  # 0 for classifier
