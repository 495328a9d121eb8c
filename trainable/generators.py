"""Heatmap generators: saliency maps of a classifier, differentiable with respect to its weights.

`saliency(model, images, target, method)` is the map of d(sum_i logit[i, target_i]) / d images
under the method's backward rule (`trainable.backward_rules` defines and justifies the rules
for ReLU and SiLU), or the Grad-CAM of the last encoder stage. With `create_graph=True` the map
carries the graph of its own computation, so a loss on it trains the weights (Set 1 and Set 3);
without it the map is a constant.

Every map is taken in a *map pass* that leaves the model as it found it:
- eval-mode normalisation and no dropout: train-mode BatchNorm couples the images of a batch
  (the gradient of the summed logits is then not the per-image map), and eval-mode maps are the
  ones a user sees at test time;
- BatchNorm running statistics are cloned for the pass: native BatchNorm updates them in place
  behind autograd's back, so a map's graph that still held the live buffers when a later
  train-mode forward ran would give silently wrong weight gradients (measured). With the clones,
  the map may be taken before or after the training forward, in any order;
- modes, forwards, hooks and requires_grad are restored on exit, also after an error, and
  parameter `.grad`s are never touched (`torch.autograd.grad`, not `.backward()`).

Eval mode uses the running statistics: with the initial ones (mean 0, var 1) a fresh
EfficientNet gives logits of about 1e-12 and maps of about 1e-16 until a few training steps
have moved them; `trainable.losses.map_alignment` is built to take maps of any scale.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationModel
from torch import Tensor, nn

# The common base of BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm and timm's BatchNormAct2d:
# the classes that own running statistics.
from torch.nn.modules.batchnorm import _NormBase

from trainable.backward_rules import modified_activations
from trainable.fast_conv import fast_grouped_convs


def saliency(model: nn.Module, images: Tensor, target: Tensor, method: str,
             create_graph: bool = False, *, fast: bool = True,
             layer: nn.Module | None = None) -> Tensor:
    """The saliency map of each image for its target class.

    Args:
        model: returns logits [B, K] or a tuple (mask, logits), as smp's Unet with aux_params.
        images: the batch; the map is taken with respect to a detached copy.
        target: class index per image, LongTensor [B].
        method: a key of `GENERATORS`.
        create_graph: make the map differentiable with respect to the weights.
        fast: route grouped (depthwise) convolutions through `trainable.fast_conv`; the same
            map and gradients, a much cheaper double backward.
        layer: gradcam only; the module whose output is the feature map (default: the deepest
            feature of `model.encoder` where there is one, else the last nn.Conv2d).

    Returns:
        The map in the images' dtype, signed and not normalised.

    Shape:
        images [B, C, H, W], target [B] -> [B, C, H, W].
    """
    try:
        generator = GENERATORS[method]
    except KeyError:
        raise KeyError(
            f"unknown saliency method {method!r}; valid: {', '.join(GENERATORS)}"
        ) from None
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    target = torch.as_tensor(target, device=images.device).reshape(-1)
    if target.numel() != images.shape[0]:
        raise ValueError(
            f"target has {target.numel()} entries for a batch of {images.shape[0]} images"
        )
    x = images.detach().requires_grad_(True)
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())  # a map is a gradient, also under no_grad
        stack.enter_context(map_pass(model))
        if fast:
            stack.enter_context(fast_grouped_convs(model))
        return generator(model, x, target, create_graph=create_graph, layer=layer)


@contextmanager
def map_pass(model: nn.Module):
    """Eval-mode normalisation, no dropout, cloned running statistics; all restored on exit."""
    modes = [(module, module.training) for module in model.modules()]
    stats = [
        (module, name, getattr(module, name))
        for module in model.modules()
        if isinstance(module, _NormBase)
        for name in ("running_mean", "running_var")
        if getattr(module, name) is not None
    ]
    try:
        # Flags set directly: smp's `train()` skips a frozen encoder, and modes must come back
        # exactly as they were, module by module.
        for module, _ in modes:
            module.training = False
        for module, name, buffer in stats:
            setattr(module, name, buffer.clone())
        yield
    finally:
        for module, name, buffer in stats:
            setattr(module, name, buffer)
        for module, training in modes:
            module.training = training


def _backprop(rule: str | None) -> Callable:
    """A generator: the input gradient under an activation backward rule (None: exact)."""

    def generator(model, x, target, *, create_graph, layer=None):
        with modified_activations(model, rule) if rule else nullcontext():
            score = _target_score(_logits(model, x), target)
            (grad,) = torch.autograd.grad(score, x, create_graph=create_graph)
        return grad

    return generator


def gradcam(model, x, target, *, create_graph, layer=None) -> Tensor:
    """Grad-CAM: relu(sum_k w_k A_k), w_k the spatial mean of d logit / d A_k, upsampled.

    A is the output of `layer`; by default the deepest feature of `model.encoder` (smp models),
    where the classification head pools, so the weights are the head's row for the class and
    Grad-CAM is CAM (about one forward's cost); for other networks the last nn.Conv2d.

    Shape:
        x [B, C, H, W] -> [B, C, H, W] (the one-channel CAM repeated over C).
    """
    # Exact rules, but out-of-place activations: an in-place ReLU after `layer` would
    # otherwise overwrite the feature the hook captured.
    with modified_activations(model, "gradient"):
        feature, logits = _feature_and_logits(model, x, layer)
        score = _target_score(logits, target)
        (feature_grad,) = torch.autograd.grad(score, feature, create_graph=create_graph)
    if not create_graph:
        feature = feature.detach()
    # In the images' precision (float32 under bf16 autocast, float64 in float64 checks).
    weights = feature_grad.to(x.dtype).mean((2, 3), keepdim=True)
    cam = F.relu((weights * feature.to(x.dtype)).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cam.expand(-1, x.shape[1], -1, -1).contiguous()


GENERATORS: dict[str, Callable] = {
    "guided_backprop": _backprop("guided_backprop"),
    "deconvnet": _backprop("deconvnet"),
    "gradient": _backprop(None),
    "gradcam": gradcam,
}


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    if isinstance(model, SegmentationModel) and model.classification_head is not None:
        # The map needs the logits only: skip the decoder, a third of a U-Net's forward.
        return model.classification_head(model.encoder(x)[-1])
    out = model(x)
    return out[-1] if isinstance(out, (tuple, list)) else out


def _feature_and_logits(model: nn.Module, x: Tensor, layer: nn.Module | None):
    if layer is None:
        layer = model.encoder if hasattr(model, "encoder") else _last_conv(model)
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        logits = _logits(model, x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"gradcam: layer {type(layer).__name__} was not called by the forward")
    feature = captured[-1]
    # An encoder returns its features shallow to deep: Grad-CAM takes the deepest.
    return (feature[-1] if isinstance(feature, (tuple, list)) else feature), logits


def _last_conv(model: nn.Module) -> nn.Module:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"gradcam: {type(model).__name__} has no nn.Conv2d; pass layer=")
    return convs[-1]


def _target_score(logits: Tensor, target: Tensor) -> Tensor:
    """Sum over the batch of each image's target logit, in float32 (also under bf16 autocast)."""
    return logits.gather(1, target.view(-1, 1)).float().sum()
