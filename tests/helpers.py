"""What the test modules share: plain functions and constants, no fixtures and no tests.

No test module imports another, so whatever two of them use lives here, and fixtures and hooks
live in conftest.py: the `gazetune(...)` runner of the real command line; the quick trial
settings `QUICK` (and `quick_set`, the same as `--set` items); the checks of a search's MLflow
runs (`trial_runs`, `assert_complete_history`) and `reap_group` for a killed driver's Ray
processes; `faulty_trial`, the trainable that injects faults into a search's trials (conftest's
`faults` fixture sets it up); `study_in_mlflow`, a study logged without training, and the checks
of what export and evaluate write (`assert_metric_shape`, `assert_png`, `identifiers`); the
small models and images of the saliency tests (`METHODS`, `mixed_net`, `smp_unet`, `images`);
`paper_part`, a paper point without what only the extended space asks for.
Product modules are imported inside the functions that use them, so that a module importing
this one depends only on the product code it exercises. The fuzzing machinery is in fuzzing.py:
its sandbox's child process imports that module and must not load torch, which this one imports.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

# ---------------------------------------------------------------------------------------------
# The command line


def gazetune(*args: str, cwd: Path | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "search", *args],
        cwd=cwd, capture_output=True, text=True, check=check,
    )


# ---------------------------------------------------------------------------------------------
# Quick trials and what a search leaves in MLflow

# Quick trials: a smaller bootstrap and one figure per class are enough here.
QUICK = {"n_boot": 200, "figures": 1}

CLASSES = ("mean", "Normal", "CHF", "pneumonia")
CONTRACT_METRICS = {"train/loss"} | {f"val/auc/{c}{b}" for c in CLASSES
                                     for b in ("", "/lo", "/hi")}


def quick_set(**more) -> list[str]:
    """`QUICK` and `more` as the KEY=VALUE items of `gazetune search --set` (a search sets the
    epochs itself, with --max-epochs)."""
    return [f"{key}={value}" for key, value in {**QUICK, **more}.items()]


def trial_runs(workdir, name, uri: str | None = None) -> dict:
    """{ray trial id: (run, {metric key: [steps]})} of a study in the embedded MLflow store
    of `workdir`, or at the tracking `uri` when given (a tracking server)."""
    from mlflow import MlflowClient

    from search import tracking

    uri = uri or tracking.resolve_tracking_uri(None, workdir)
    client = MlflowClient(uri)
    out = {}
    for run in tracking.find_trial_runs(uri, name):
        steps = {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k))
                 for k in run.data.metrics}
        assert run.data.tags[tracking.TRIAL_TAG] not in out, "two runs for one trial"
        out[run.data.tags[tracking.TRIAL_TAG]] = (run, steps)
    return out


def assert_complete_history(steps: dict, epochs: int) -> None:
    """Every contract key logged once per epoch 1..epochs: no gap, no duplicate."""
    for key in CONTRACT_METRICS:
        assert steps[key] == list(range(1, epochs + 1)), key


def reap_group(pgid: int, wait_s: float = 60.0) -> None:
    """Wait for the killed driver's local Ray processes to go (they share its fate), then make
    sure: leftover workers must not write to the study while it resumes."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------
# Faults in a search's trials (the `faults` fixture of conftest.py sets them up)

FAULTS_ENV = "GAZETUNE_TEST_FAULTS"  # "<folder for counters>:<fault>:<times>:<epoch>"


def faulty_trial(config, setup):
    """`search.trial.trial_fn`, but the first trial to start meets a fault in one epoch, before
    reporting it, as long as fewer than `times` faults have happened (files count them across
    the processes Tune retries the trial in).

    The fault: "raise" (a RuntimeError), "sigkill" (the trial's process dies without a word),
    "oom" (torch's OutOfMemoryError), or "diverge" (a DivergedError, after a perfect first
    epoch: only its failure can keep it from being the best). The counters, in the folder:
    `faulty` (the faulty trial's id), `attempts` (its every start, retries included),
    `trainings` (its calls of the training loop) and `faults`; read them with `read_count`.
    """
    from ray import tune

    from search.trial import trial_fn
    from trainable.config import METRIC
    from trainable.errors import DivergedError
    from trainable.loop import train as loop_train

    folder, fault, times, epoch = os.environ[FAULTS_ENV].split(":")
    folder, times, epoch = Path(folder), int(times), int(epoch)
    trial_id = tune.get_context().get_trial_id()
    if _claim(folder / "faulty", trial_id) != trial_id:
        return trial_fn(config, setup)
    _count(folder / "attempts")  # every start, retries included

    def train(cfg, report, resume_from):
        _count(folder / "trainings")

        def faulty_report(epoch_report):
            if fault == "diverge" and epoch_report.epoch == 1:
                # A perfect first epoch: only its failure can keep it from being the best.
                metrics = {**epoch_report.metrics, METRIC: 1.0}
                epoch_report = dataclasses.replace(epoch_report, metrics=metrics)
            elif epoch_report.epoch == epoch and read_count(folder / "faults") < times:
                _count(folder / "faults")
                if fault == "sigkill":  # the trial's process dies without a word
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault == "diverge":
                    raise DivergedError(f"training diverged at epoch {epoch}, step 1: loss "
                                        "term(s) total=nan (injected)")
                if fault == "oom":
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate "
                                                 "2.00 GiB (injected)")
                raise RuntimeError(f"injected fault in epoch {epoch}")
            report(epoch_report)

        return loop_train(cfg, report=faulty_report, resume_from=resume_from)

    trial_fn(config, setup, train=train)


def _claim(path: Path, trial_id: str) -> str:
    """The trial id written in `path` by the first trial to create it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return path.read_text()
    with os.fdopen(fd, "w") as out:
        out.write(trial_id)
    return trial_id


def read_count(counter: Path) -> int:
    """How many times `faulty_trial` counted in `counter`."""
    return len(counter.read_text()) if counter.exists() else 0


def _count(counter: Path) -> None:
    counter.write_text("x" * (read_count(counter) + 1))  # one process of the trial at a time


# ---------------------------------------------------------------------------------------------
# A study in MLflow without training, and checks of what export and evaluate write

STUDY = "tiny"
# (config, validation mean AUC per epoch, pruned): the first peaks at epoch 2 of 3.
STUDY_TRIALS = [
    ({"loss_set": "baseline", "loss_weight": 1.0, "lr": 3e-3, "dropout": 0.2},
     [0.60, 0.80, 0.70], False),
    ({"loss_set": "classifier", "lr": 1e-3, "dropout": 0.5}, [0.55, 0.65, 0.75], False),
    ({"loss_set": "set2", "generator": "deconvnet", "loss_weight": 0.5, "lr": 1e-3,
      "dropout": 0.1}, [0.50], True),
]


def study_in_mlflow(cache: Path, tracking_uri: str, scratch: Path, name: str = STUDY,
                    trials=STUDY_TRIALS, calibrated: bool = False) -> dict[str, Path]:
    """Log `trials` into study `name` the way a search does; {run id: checkpoint folder}.

    Each best epoch saves that epoch's weights (a model initialised with the epoch as seed)
    and a heatmap-panel figure, which `TrialRun.log_epoch` uploads like a training's.
    `calibrated`: BatchNorm statistics set on the training images first, as training starts
    (`calibrate_batchnorm`), so that eval-mode outputs differ between images (a fresh network's
    are nearly constant) and test AUCs say something.
    """
    from search import tracking
    from trainable import checkpoint
    from trainable.config import TrialConfig
    from trainable.data.cache import input_hash
    from trainable.figures import heatmap_panels, save_figure
    from trainable.loop import EpochReport
    from trainable.model import build_model

    experiment_id = tracking.ensure_experiment(name, tracking_uri)
    parent = tracking.start_parent_run(experiment_id, {"name": name, "space": "paper"},
                                       tracking_uri)
    images = np.load(cache / "dataset.npz")["images"][:1].astype(np.float32)
    panels = save_figure(heatmap_panels(images, images, images, images), scratch / "panels.png")
    checkpoints = {}
    for i, (overrides, history, pruned) in enumerate(trials):
        folder = scratch / f"trial{i}"
        cfg = TrialConfig.from_dict({**QUICK, "epochs": 3, **overrides, "cache": str(cache),
                                     "checkpoint_dir": str(folder)})
        run = tracking.TrialRun(tracking_uri, experiment_id, parent, f"t{i}", cfg.to_dict(),
                                number=i)
        best = -math.inf
        for epoch, auc in enumerate(history, start=1):
            metrics = {"train/loss": 1.0 / epoch, **epoch_aucs(auc)}
            figures, is_best = {}, auc > best
            if is_best:
                best = auc
                torch.manual_seed(epoch)
                model = build_model(cfg)
                if calibrated:
                    _calibrate(model, cache, cfg.batch_size)
                checkpoint.save_best(folder, model.state_dict(), cfg.to_dict(),
                                     {**metrics, "epoch": epoch,
                                      "cache_input_hash": input_hash(cache)})
                drawn = folder / "figures" / f"val_{cfg.generator}.png"
                drawn.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(panels, drawn)
                figures = {drawn.name: drawn}
            run.log_epoch(EpochReport(epoch, metrics, folder, is_best, figures))
        run.finish(pruned=pruned)
        checkpoints[run.run_id] = folder
    return checkpoints


def _calibrate(model, cache: Path, batch_size: int) -> None:
    """As training starts: on (up to) the first 32 training images."""
    from trainable.model import calibrate_batchnorm

    data = np.load(cache / "dataset.npz")
    train = data["images"][data["split"] == 0][:32].astype(np.float32)
    calibrate_batchnorm(model, torch.from_numpy(train).unsqueeze(1).split(batch_size))


def epoch_aucs(mean: float) -> dict[str, float]:
    """The contract's validation keys for one epoch, the classes spread around `mean`."""
    from trainable.config import CLASS_NAMES

    values = {"mean": mean, **{c: mean + d for c, d in zip(CLASS_NAMES, (0.05, 0.0, -0.05))}}
    out = {}
    for name, auc in values.items():
        out.update({f"val/auc/{name}": auc, f"val/auc/{name}/lo": auc - 0.1,
                    f"val/auc/{name}/hi": min(1.0, auc + 0.1)})
    return out


def identifiers(dataset: Path, cache: Path) -> set[str]:
    """Every dicom_id, patient_id and study_id of the synthetic release, and the cache's uids."""
    from trainable.data import load_cache

    with open(dataset / "egd-cxr" / "master_sheet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    found = {row[key] for row in rows for key in ("dicom_id", "patient_id", "study_id")}
    return found | {str(uid) for uid in load_cache(cache).uids}


def assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) > 100


def assert_metric_shape(scores: dict) -> None:
    """{name: [auc, lo, hi]} for mean and every class; lo <= auc <= hi where defined."""
    from search.study import SCORES

    assert set(scores) == set(SCORES)
    for name, value in scores.items():
        assert len(value) == 3, name
        auc, lo, hi = value
        if auc is not None:
            assert 0.0 <= lo <= auc <= hi <= 1.0, (name, value)


# ---------------------------------------------------------------------------------------------
# Models and images of the saliency tests


def __getattr__(name: str):
    # METHODS, computed when a test module imports it: a module that never uses the
    # generators does not import them.
    if name == "METHODS":
        from trainable.generators import GENERATORS

        return tuple(GENERATORS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MixedNet(nn.Module):
    """ReLU, SiLU, BatchNorm, a depthwise convolution and dropout: the encoder's ingredients."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU())
        self.depthwise = nn.Sequential(
            nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), nn.BatchNorm2d(4), nn.SiLU()
        )
        self.last = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(24, 3)
        )

    def forward(self, x):
        return self.head(self.last(self.depthwise(self.stem(x))))


def mixed_net(dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = MixedNet().to(dtype)
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    return net.train()


def smp_unet(encoder: str = "efficientnet-b0") -> nn.Module:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet(encoder, encoder_weights=None, in_channels=1, classes=1,
                     aux_params={"classes": 3, "dropout": 0.2})
    # Running statistics of real activations: at initialisation (mean 0, var 1) an eval-mode
    # EfficientNet gives logits of 1e-12 and maps too small to compare meaningfully.
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(torch.rand(8, 1, 64, 64))
    return model


def images(batch=3, size=12, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, size, size, generator=g, dtype=dtype)


# The keys a paper point sets (so that it fits the extended space) that the paper's space never
# asks for.
EXTENDED_ONLY = ("counterexample", "cls_ramp", "mask_gate")


def paper_part(point: dict) -> dict:
    """A paper point without what only the extended space asks for (`EXTENDED_ONLY`)."""
    return {k: v for k, v in point.items() if k not in EXTENDED_ONLY}
