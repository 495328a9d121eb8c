"""Augmentation on the device, one random affine per image applied to image and gaze together.

No horizontal flips: the heart sits on the patient's left, and a flipped radiograph is not a
radiograph the model will ever see. Small rotations, scalings and shifts model positioning;
brightness and contrast jitter model exposure (image only, never the gaze map).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trainable.config import COUNTEREXAMPLE_FILLS, COUNTEREXAMPLE_OUTLINES


def random_affine(
    images: torch.Tensor,
    maps: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 5.0,
    scale: float = 0.08,
    shift: float = 0.06,
    jitter: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly transform a batch of images and their gaze maps with the same geometry.

    Shape:
        images, maps: [B, 1, H, W] on any device; returns tensors of the same shapes.
    """
    b, device = images.shape[0], images.device

    def uniform(low, high):
        return torch.rand(b, generator=generator, device="cpu").mul(high - low).add(low).to(device)

    angle = uniform(-degrees, degrees) * (math.pi / 180)
    s = uniform(1 - scale, 1 + scale)
    tx, ty = uniform(-shift, shift), uniform(-shift, shift)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    maps = F.grid_sample(maps, grid.to(maps.dtype), padding_mode="zeros", align_corners=False)
    gain = uniform(1 - jitter, 1 + jitter).view(b, 1, 1, 1).to(images.dtype)
    bias = uniform(-jitter / 2, jitter / 2).view(b, 1, 1, 1).to(images.dtype)
    return (images * gain + bias).clamp(0, 1), maps



def gaze_counterexamples(
    images: torch.Tensor,
    maps: torch.Tensor,
    generator: torch.Generator,
    fill: str,
    p: float = 1.0,
    region: float = 0.1,
    outline: str = "own",
) -> torch.Tensor:
    """Replace what lies outside each image's gaze region, so that nothing there can predict
    the label: a feature the radiologist never looked at (a lead marker, a tube, a text label
    that correlates with the class) becomes noise to the classifier.

    The region is where the image's gaze heatmap reaches `region` x its maximum; the gaze alone
    defines it, no knowledge of where a shortcut is. An image without gaze (an all-zero map)
    keeps its pixels. Fills: ``swap`` the same pixels of another image of the batch (real
    radiograph content, drawn from another image, so it carries that image's label if anything:
    uninformative of this one's); ``mean`` the image's mean; ``noise`` uniform noise in [0, 1];
    ``blur`` the image blurred with a Gaussian of a sixteenth of its side (what survives is
    coarse layout only).

    Args:
        images, maps: the training batch after augmentation, and its gaze maps.
        generator: the CPU generator of the trial's augmentation (reproducible, resumable).
        fill: one of `COUNTEREXAMPLE_FILLS`.
        p: the share of images that get a counterexample (each drawn independently).
        region: the gaze region's threshold as a fraction of each map's maximum.
        outline: whose gaze region an image keeps: ``own``; ``other``, that of another image
            of the batch; ``batch``, the union of the batch's regions. Why not always its own:
            where a radiologist looks depends on the finding, so the outline of the kept area
            tells the class (on the synthetic release a linear model reads the label from the
            own-region mask alone with 82% accuracy), and a classifier trained on
            counterexamples learns the outline instead of what is inside it.

    Shape:
        images, maps: [B, 1, H, W] with B >= 2 for ``swap``; returns images' shape.
    """
    b, device = images.shape[0], images.device
    peak = maps.amax(dim=(1, 2, 3), keepdim=True)
    outside = (maps < region * peak) & (peak > 0)
    if outline == "other":
        outside = outside[_others(b, generator).to(device)]
    elif outline == "batch":
        gazed = peak.flatten() > 0
        outside = outside[gazed].all(dim=0, keepdim=True).expand_as(outside) & (peak > 0)
    elif outline != "own":
        raise ValueError(f"outline: {outline!r} is not one of {COUNTEREXAMPLE_OUTLINES}")
    chosen = (torch.rand(b, generator=generator) < p).to(device).view(b, 1, 1, 1)
    if fill == "swap":
        filled = images[_others(b, generator).to(device)]
    elif fill == "mean":
        filled = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    elif fill == "noise":
        filled = torch.rand(images.shape, generator=generator).to(device, images.dtype)
    elif fill == "blur":
        from torchvision.transforms.v2.functional import gaussian_blur

        sigma = max(images.shape[-1] / 16, 1.0)
        kernel = 2 * math.ceil(3 * sigma) + 1
        filled = gaussian_blur(images, [kernel, kernel], [sigma, sigma])
    else:
        raise ValueError(f"fill: {fill!r} is not one of {COUNTEREXAMPLE_FILLS}")
    return torch.where(outside & chosen, filled, images)


def _others(b: int, generator: torch.Generator) -> torch.Tensor:
    """For each of `b` images another one's index: a shift of 1 to b-1 places, never itself."""
    shift = torch.randint(1, b, (b,), generator=generator) if b > 1 else torch.zeros(b)
    return (torch.arange(b) + shift).remainder(b).long()
