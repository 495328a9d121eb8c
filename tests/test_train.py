"""`trainable.train` end to end on a small synthetic cache (64 px), plus its building blocks."""

import math

import numpy as np
import pytest
import torch

from trainable import train
from trainable.checkpoint import load_best, load_torch
from trainable.config import ConfigError, TrialConfig, parse_overrides
from trainable.errors import DivergedError
from trainable.loop import CyclicFactor, EpochReport

CONTRACT_KEYS = ["train/loss"] + [
    f"val/auc/{name}{suffix}"
    for name in ("mean", "Normal", "CHF", "pneumonia")
    for suffix in ("", "/lo", "/hi")
]


def quick(cache, tmp_path, **over):
    cfg = {"cache": str(cache), "epochs": 2, "batch_size": 8, "n_boot": 200, "figures": 1,
           "threads": 2, "checkpoint_dir": str(tmp_path / "ck"), "lr": 1e-3}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("loss_set", ["classifier", "baseline", "set1", "set2", "set3", "rrr",
                                      "rrr_abs"])
def test_train_every_loss_set(small_cache, tmp_path, loss_set):
    """Two epochs for set3 (every kind of term at once), one for the others to keep CI short."""
    epochs = 2 if loss_set == "set3" else 1
    reports: list[EpochReport] = []
    final = train(quick(small_cache, tmp_path, loss_set=loss_set, generator="guided_backprop",
                        epochs=epochs), report=reports.append)
    assert [r.epoch for r in reports] == list(range(1, epochs + 1))
    for rep in reports:
        for key in CONTRACT_KEYS:
            assert math.isfinite(rep.metrics[key]), key
            assert 0.0 <= rep.metrics[key] <= 1.0 or key == "train/loss"
        assert rep.metrics["val/auc/mean/lo"] <= rep.metrics["val/auc/mean"] <= \
            rep.metrics["val/auc/mean/hi"]
    terms = {k for k in reports[0].metrics if k.startswith("train/") and k != "train/seconds"}
    expected = {"classifier": {"cls"}, "baseline": {"cls", "mask_gaze"}, "set1": {"cls", "map_gaze"},
                "set2": {"cls", "mask_map"}, "set3": {"cls", "mask_gaze", "map_gaze"},
                "rrr": {"cls", "rrr"}, "rrr_abs": {"cls", "rrr_abs"}}[loss_set]
    assert {f"train/{t}" for t in expected} | {"train/loss"} <= terms
    assert reports[0].is_best  # the first epoch is always the best so far
    assert reports[0].figures and all(p.is_file() for p in reports[0].figures.values())
    _state, config, metrics = load_best(final["checkpoint_dir"])
    assert config["loss_set"] == loss_set and metrics["epoch"] == final["best_epoch"]
    assert final["best/val/auc/mean"] == max(r.metrics["val/auc/mean"] for r in reports)
    if loss_set == "rrr_abs":  # its unit, measured once, logged and kept for a resume
        scale = reports[0].metrics["train/rrr_scale"]
        assert math.isfinite(scale) and scale > 0
        assert load_torch(final["checkpoint_dir"] + "/state.pt")["rrr_scale"] == scale


def test_train_with_the_papers_recipe_and_maps_of_every_output(small_cache, tmp_path):
    """set3 with the paper's mask loss and gaze target, its map term over all three outputs."""
    reports: list[EpochReport] = []
    train(quick(small_cache, tmp_path, loss_set="set3", generator="gradient", epochs=1,
                figures=0, seg_loss="bce", gaze_target="reference", map_outputs="all"),
          report=reports.append)
    metrics = reports[0].metrics
    assert all(math.isfinite(metrics[k]) for k in CONTRACT_KEYS)
    # BCE against a target in [30/255, 215/255] cannot reach 0, unlike 1 - CC
    assert 0.3 < metrics["train/mask_gaze"] < 1.5 and 0 <= metrics["train/map_gaze"] <= 2


def test_resume_continues_where_it_stopped(small_cache, tmp_path):
    """Interrupted after one of three epochs and resumed: the same numbers as three in one go."""
    straight = []
    train(quick(small_cache, tmp_path / "a", epochs=3, figures=0), report=straight.append)

    first = []

    def interrupt_after_one(rep):
        first.append(rep)
        if rep.epoch == 1:
            raise KeyboardInterrupt  # like Ctrl-C, after the epoch's checkpoint was written

    with pytest.raises(KeyboardInterrupt):
        train(quick(small_cache, tmp_path / "b", epochs=3, figures=0), report=interrupt_after_one)
    resumed = []
    train(quick(small_cache, tmp_path / "c", epochs=3, figures=0), report=resumed.append,
          resume_from=first[-1].checkpoint_dir)
    assert [r.epoch for r in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed):
        assert a.metrics["train/loss"] == pytest.approx(b.metrics["train/loss"], rel=1e-5)
        assert a.metrics["val/auc/mean"] == pytest.approx(b.metrics["val/auc/mean"], abs=1e-6)


def test_diverging_training_stops_with_a_reason(small_cache, tmp_path, monkeypatch):
    # The config refuses a learning rate above 1, and within the range Adam with clipping off
    # does not diverge on this data: the optimiser takes steps of 1e30 here instead, so the
    # weights really overflow.
    import trainable.loop

    monkeypatch.setattr(trainable.loop, "_optimizer",
                        lambda cfg, model: torch.optim.SGD(model.parameters(), lr=1e30))
    with pytest.raises(DivergedError, match=r"epoch 1, step \d+: loss term"):
        train(quick(small_cache, tmp_path, loss_set="classifier", grad_clip=0.0,
                    epochs=3, figures=0))


def test_checkpoint_loads_without_unpickling(small_cache, tmp_path):
    final = train(quick(small_cache, tmp_path, loss_set="classifier", epochs=1, figures=0))
    state = load_torch(f"{final['checkpoint_dir']}/state.pt")  # weights_only=True inside
    assert state["epoch"] == 1 and isinstance(state["rng"]["loop"], torch.Tensor)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="lerning_rate"):
        TrialConfig.from_dict({"lerning_rate": 0.1})
    with pytest.raises(ConfigError, match="'epochs'"):
        TrialConfig.from_dict({"epochs": "three"})
    with pytest.raises(ConfigError, match="'loss_set'"):
        TrialConfig.from_dict({"loss_set": "set4"})
    with pytest.raises(ConfigError, match="'lr': expected float"):
        TrialConfig.from_dict({"lr": [0.1]})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["lr0.1"])
    cfg = TrialConfig.from_dict(parse_overrides(["lr=0.01", "augment=false",
                                                 "encoder_weights=None"]))
    assert (cfg.lr, cfg.augment, cfg.encoder_weights) == (0.01, False, None)


def test_cyclic_schedule_matches_the_dataset_authors():
    """Effective rates of their published U-Net run (lr 0.0090552, step 2), the dataset authors' code."""
    lr = 0.0090552
    f = CyclicFactor(2, lr)
    effective = [lr * f(e) for e in range(7)]
    np.testing.assert_allclose(effective, [8.2e-5, 4.6e-3, 9.1e-3, 4.6e-3, 8.2e-5, 2.3e-3, 4.6e-3],
                               rtol=0.03)


def test_the_classification_ramp_weighs_the_term_step_by_step(small_cache, tmp_path):
    from trainable.loop import cls_weight

    cfg = TrialConfig.from_dict({"loss_set": "baseline", "cls_ramp": 2.0})
    assert [cls_weight(cfg, p) for p in (0, 0.5, 1, 2, 3)] == [0, 0.25, 0.5, 1, 1]
    off = TrialConfig.from_dict({"loss_set": "baseline"})
    assert cls_weight(off, 0) == 1 and cls_weight(
        TrialConfig.from_dict({"loss_set": "classifier", "cls_ramp": 2.0}), 0) == 1
    # Wired into training: with a ramp far longer than the run, the total is the mask term.
    reports: list[EpochReport] = []
    train(quick(small_cache, tmp_path, loss_set="baseline", epochs=1, figures=0,
                cls_ramp=1e4), report=reports.append)
    m = reports[0].metrics
    assert m["train/loss"] == pytest.approx(m["train/mask_gaze"], abs=1e-3 * m["train/cls"])
    assert m["train/cls"] > 0.1
