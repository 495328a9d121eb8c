"""Augmentation on the device, one random affine per image applied to image and gaze together.

No horizontal flips: the heart sits on the patient's left, and a flipped radiograph is not a
radiograph the model will ever see. Small rotations, scalings and shifts model positioning;
brightness and contrast jitter model exposure (image only, never the gaze map).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
