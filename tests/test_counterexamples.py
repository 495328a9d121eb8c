"""Gaze-guided counterexamples (`counterexample=swap|mean|noise|blur`): what lies outside the
gaze region is replaced, what lies inside is kept, the region comes from the gaze alone, the
draws are the trial's generator's, and a training with them runs end to end."""

from __future__ import annotations

import math

import pytest
import torch

from trainable import train
from trainable.augment import gaze_counterexamples
from trainable.config import COUNTEREXAMPLE_FILLS, ConfigError, TrialConfig


def batch(b: int = 4, side: int = 32):
    """Images with a distinct constant level each, a 'marker' in one corner, and gaze maps that
    peak in the middle and are exactly zero far from it."""
    images = torch.linspace(0.2, 0.8, b).view(b, 1, 1, 1).repeat(1, 1, side, side)
    images[0, :, :4, :4] = 1.0  # a marker on the first image, where no one looked
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centre = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2).float()
    maps = torch.exp(-centre / (2 * 4.0**2)).expand(b, 1, side, side).clone()
    maps[1] *= 3.0  # the region is relative to each map's own maximum
    return images, maps


@pytest.mark.parametrize("fill", COUNTEREXAMPLE_FILLS)
def test_outside_the_gaze_is_replaced_and_inside_is_kept(fill):
    images, maps = batch()
    out = gaze_counterexamples(images, maps, torch.Generator().manual_seed(0), fill)
    inside = maps >= 0.1 * maps.amax(dim=(1, 2, 3), keepdim=True)
    assert out.shape == images.shape
    assert torch.equal(out[inside], images[inside])
    marker = out[0, :, :4, :4]
    assert (marker != 1.0).all()  # the marker is gone
    if fill == "swap":  # another image's pixels, never the image's own
        levels = images[:, 0, 16, 16]
        for i in range(len(images)):
            assert out[i, 0, 31, 31] in levels and out[i, 0, 31, 31] != levels[i]
    elif fill == "mean":
        torch.testing.assert_close(out[:, :, 31, 31], images.mean(dim=(2, 3)))
    elif fill == "noise":
        outside = out[~inside]
        assert 0 <= outside.min() and outside.max() <= 1 and outside.std() > 0.2
    else:  # blur: the marker's pixels are spread into their neighbourhood
        assert marker.max() < 1.0


def test_the_share_p_the_empty_gaze_and_the_generator():
    images, maps = batch(b=64)
    maps[0] = 0  # no gaze recorded: nothing to go by
    changed = (gaze_counterexamples(images, maps, torch.Generator().manual_seed(1), "mean", p=0.5)
               != images).flatten(1).any(1)
    assert not changed[0] and 16 < int(changed.sum()) < 48
    none = gaze_counterexamples(images, maps, torch.Generator().manual_seed(1), "noise", p=0.0)
    assert torch.equal(none, images)
    a = gaze_counterexamples(images, maps, torch.Generator().manual_seed(2), "swap")
    b = gaze_counterexamples(images, maps, torch.Generator().manual_seed(2), "swap")
    assert torch.equal(a, b)


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="counterexample"):
        TrialConfig.from_dict({"counterexample": "inpaint"})
    with pytest.raises(ConfigError, match="counterexample_region"):
        TrialConfig.from_dict({"counterexample_region": 0.0})
    with pytest.raises(ConfigError, match="counterexample_p"):
        TrialConfig.from_dict({"counterexample_p": 1.5})


def test_training_with_counterexamples(small_cache, tmp_path):
    reports = []
    train({"cache": str(small_cache), "epochs": 1, "batch_size": 8, "n_boot": 100,
           "figures": 0, "threads": 2, "checkpoint_dir": str(tmp_path / "ck"),
           "loss_set": "classifier", "counterexample": "swap"}, report=reports.append)
    assert math.isfinite(reports[0].metrics["train/loss"])
    assert math.isfinite(reports[0].metrics["val/auc/mean"])
