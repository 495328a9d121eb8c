"""Gaze-guided counterexamples (`counterexample=swap|mean|noise|blur`): outside the gaze region
the pixels are replaced, inside they are kept, the region comes from the gaze alone, the draws
are the trial's generator's; and selection by them (`selection=gaze_auc`): the validation AUC on
swapped counterexamples, the epoch it picks, and a search that optimises and ranks by it."""

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


def test_the_outline_of_another_image_or_of_the_batch():
    """`other`: each image keeps another image's gaze region; `batch`: the union of all."""
    b, side = 4, 32
    images = torch.rand(b, 1, side, side, generator=torch.Generator().manual_seed(0))
    maps = torch.zeros(b, 1, side, side)
    for i in range(b):  # a square of gaze in a different place for each image
        maps[i, :, 8 * i : 8 * i + 8, 8 * i : 8 * i + 8] = 1.0 + i
    own = [maps[i, 0] > 0 for i in range(b)]
    gen = torch.Generator().manual_seed(3)
    other = gaze_counterexamples(images, maps, gen, "noise", outline="other")
    for i in range(b):
        kept = other[i, 0] == images[i, 0]
        assert any(torch.equal(kept, own[j]) for j in range(b) if j != i)
    union = gaze_counterexamples(images, maps, gen, "noise", outline="batch")
    for i in range(b):
        assert torch.equal(union[i, 0] == images[i, 0], torch.stack(own).any(0))
    with pytest.raises(ValueError, match="outline"):
        gaze_counterexamples(images, maps, gen, "noise", outline="mine")


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
    with pytest.raises(ConfigError, match="counterexample_outline"):
        TrialConfig.from_dict({"counterexample_outline": "theirs"})
    with pytest.raises(ConfigError, match="counterexample_consistency"):
        TrialConfig.from_dict({"counterexample_consistency": -1.0})


def test_gaze_auc_scores_the_validation_counterexamples(small_cache):
    from trainable.data import load_cache
    from trainable.loop import DeviceData, counterexample_auc, predict_batches
    from trainable.metrics import bootstrap_auc
    from trainable.model import build_model, calibrate_batchnorm

    cfg = TrialConfig.from_dict({"cache": str(small_cache), "n_boot": 100, "batch_size": 8})
    torch.manual_seed(0)
    model = build_model(cfg)
    data = DeviceData(load_cache(small_cache), torch.device("cpu"))
    idx = data.indices("val")
    rows = torch.as_tensor(idx)
    calibrate_batchnorm(model, data.images[rows].split(8))  # outputs that differ by image
    got = counterexample_auc(model, data, idx, cfg, prefix="val")
    swapped = gaze_counterexamples(data.images[rows], data.heatmaps[rows],
                                   torch.Generator().manual_seed(0), "swap")
    assert not torch.equal(swapped, data.images[rows])
    probs, _ = predict_batches(model, swapped.split(8), cfg, torch.device("cpu"))
    want = bootstrap_auc(data.cache.labels[idx], probs, ("Normal", "CHF", "pneumonia"),
                         n_boot=100)
    for name, values in want.items():
        np_values = [got[f"val/gaze_auc/{name}{b}"] for b in ("", "/lo", "/hi")]
        assert np_values == pytest.approx(list(values), nan_ok=True)
    # the same images at every call: the score of a model does not move by itself
    assert counterexample_auc(model, data, idx, cfg, prefix="val") == got


def test_training_on_counterexamples_selected_by_gaze_auc(small_cache, tmp_path):
    """One training with both: counterexamples in, the checkpoint epoch chosen by gaze_auc."""
    from trainable.checkpoint import load_best

    reports = []
    final = train({"cache": str(small_cache), "epochs": 2, "batch_size": 8, "n_boot": 100,
                   "figures": 0, "threads": 2, "checkpoint_dir": str(tmp_path / "ck"),
                   "loss_set": "classifier", "counterexample": "swap",
                   "counterexample_consistency": 10.0, "selection": "gaze_auc"},
                  report=reports.append)
    for r in reports:  # the total holds the consistency term at its weight
        m = r.metrics
        assert 0 < m["train/consistency"] < math.log(2)
        assert m["train/loss"] == pytest.approx(m["train/cls"] + 10 * m["train/consistency"])
    gaze = [r.metrics["val/gaze_auc/mean"] for r in reports]
    assert all(math.isfinite(g) for g in gaze)
    finite = [g if math.isfinite(g) else -math.inf for g in gaze]
    best = finite.index(max(finite)) + 1  # the first epoch to reach the peak
    assert final["best_epoch"] == best and final["best/val/gaze_auc/mean"] == max(finite)
    assert [r.epoch for r in reports if r.is_best][-1] == best
    assert load_best(final["checkpoint_dir"])[2]["epoch"] == best
    assert "val/auc/mean" in reports[0].metrics  # both scores are kept


def test_a_search_with_gaze_selection_optimises_and_ranks_by_it(tmp_path):
    import pickle

    from search import tracking
    from search.progress import ProgressPrinter
    from search.settings import SearchSettings
    from search.study import ranked_trials, read_trials
    from trainable.loop import EpochReport

    assert SearchSettings(name="s").metric == "val/auc/mean"
    gaze = SearchSettings(name="s", fixed={"selection": "gaze_auc"})
    assert gaze.metric == "val/gaze_auc/mean"
    # a printer pickled before it knew its metric reports the default one
    old = pickle.loads(pickle.dumps(ProgressPrinter(4, 2, gaze.metric)))
    assert old.metric == "val/gaze_auc/mean"
    del old.__dict__["metric"]
    assert old.metric == "val/auc/mean"
    # The read side ranks by each trial's selection metric, at the epoch it peaks.
    uri = tracking.resolve_tracking_uri(None, tmp_path)
    experiment = tracking.ensure_experiment("g", uri)
    histories = {0: ([0.9, 0.8], [0.5, 0.7]), 1: ([0.6, 0.6], [0.6, 0.65])}  # (auc, gaze)
    for number, (aucs, gazes) in histories.items():
        config = TrialConfig.from_dict({"selection": "gaze_auc", "loss_set": "classifier"})
        run = tracking.TrialRun(uri, experiment, None, f"t{number}", config.to_dict(),
                                number=number)
        for epoch, (auc, g) in enumerate(zip(aucs, gazes), start=1):
            run.log_epoch(EpochReport(epoch, {"val/auc/mean": auc, "val/gaze_auc/mean": g},
                                      tmp_path, False))
        run.finish()
    trials = {t.number: t for t in read_trials(uri, "g")}
    assert trials[0].epoch == 2 and trials[0].score == 0.7 and trials[0].val["mean"][0] == 0.8
    assert [t.number for t in ranked_trials(trials.values())] == [0, 1]



def test_the_search_summary_names_the_score_the_best_trial_was_selected_by(capsys):
    from search.cli import _search_summary
    from search.service import SearchSummary

    metrics = {f"val/{name}/mean{b}": value for name, base in (("auc", 0.9), ("gaze_auc", 0.8))
               for b, value in (("", base), ("/lo", base - 0.1), ("/hi", base + 0.05))}
    best = {"trial_id": "t1", "run_id": "r1", "config": {}, "epoch": 3, "metrics": metrics}
    for metric, line in (
            ("val/gaze_auc/mean", ("epoch 3: val/gaze_auc/mean 0.800 [0.700, 0.850], "
                                   "val/auc/mean 0.900 [0.800, 0.950]")),
            ("val/auc/mean", "epoch 3: val/auc/mean 0.900 [0.800, 0.950]\n")):
        summary = SearchSummary("s", "/p", 2, 0, 0, False, {**best, "metric": metric})
        assert _search_summary(summary) == 0
        assert line in capsys.readouterr().out
