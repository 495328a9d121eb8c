"""The training loop of one trial: `train(config)` in plain Python.

Metrics leave through one hook, `report(EpochReport)`, called after every epoch; the search
service turns it into MLflow logging and `tune.report`, and without a hook the metrics are
printed. Model selection uses the validation split only; the test split is never touched here.
Also the pieces that evaluation and the logged model reuse: the cache on the device
(`DeviceData`), `predict` (`predict_batches`), `explain` (`explain_batches`), `evaluate`, and the
device a config asks for (`choose_device`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainable import checkpoint
from trainable.augment import gaze_counterexamples, random_affine
from trainable.config import CLASS_NAMES, METRIC, ConfigError, TrialConfig
from trainable.errors import DivergedError, OutOfGpuMemory
from trainable.files import check_writable
from trainable.loss_sets import LOSS_SETS, applies
from trainable.model import build_model, calibrate_batchnorm, split_outputs


@dataclass(frozen=True)
class EpochReport:
    epoch: int  # epochs finished, 1-based (== Ray's training_iteration)
    metrics: dict[str, float]
    checkpoint_dir: Path  # state.pt + best/: pass back as `resume_from` to continue
    is_best: bool  # this epoch improved the selection metric (val/auc/mean by default)
    figures: dict[str, Path] = field(default_factory=dict)  # PNGs drawn this epoch


def train(
    config: dict | TrialConfig,
    report: Callable[[EpochReport], None] | None = None,
    resume_from: str | Path | None = None,
) -> dict:
    """Train one configuration; returns the last epoch's metrics plus the best epoch's.

    Out of memory anywhere in training (`torch.OutOfMemoryError`) ends it with `OutOfGpuMemory`:
    one line naming the device, batch size, image size and GPU share, and what to change. The
    trial's memory is released first (on CUDA, `empty_cache` returns it to the device), so
    trials sharing the GPU can use it at once. Under a search the policy is Tune's usual one:
    the trial is retried from its last checkpoint, up to `max_failures` times, since an OOM
    among trials that share a GPU is often transient (a neighbour's peak); a configuration that
    never fits fails with the message.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    cache = check_inputs(cfg)
    device = choose_device(cfg)
    try:
        return _train(cfg, device, cache, report, resume_from)
    except torch.OutOfMemoryError as err:
        failure = out_of_memory(cfg, device, image_size=cache.images.shape[-1])
        # The frames of the failed step hold the model, the batch and its activations: clearing
        # them lets `empty_cache` return that memory now, not when the process is torn down.
        traceback.clear_frames(err.__traceback__)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise failure from err


def check_inputs(cfg: TrialConfig):
    """What `train` refuses before any work, in one line naming the file: a checkpoint folder
    it cannot write, a cache it cannot read, a training or validation split without every
    class. Returns the loaded cache."""
    from trainable.data import load_cache
    from trainable.data.cache import check_splits

    if cfg.checkpoint_dir:
        check_writable(cfg.checkpoint_dir, "checkpoint folder")
    cache = load_cache(cfg.cache)  # also checks that the manifest's counts match the arrays
    check_splits(cfg.cache)
    size = cache.images.shape[-1]
    if size % 32:
        raise ConfigError(f"cache {cfg.cache}: images of {size} px, but the U-Net halves them "
                          f"five times: prepare with --size a multiple of 32 (e.g. 224)")
    return cache


def out_of_memory(cfg: TrialConfig, device: torch.device, image_size: int) -> OutOfGpuMemory:
    """The one-line error for a trial that ran out of memory on `device` (read its peak there)."""
    share = (f"gpu_memory_fraction={cfg.gpu_memory_fraction:g}" if cfg.gpu_memory_fraction
             else "gpu_memory_fraction=0 (no cap)")
    where, peak, advice = str(device), "", ""
    if device.type == "cuda":
        gib = 2.0**30
        total = torch.cuda.get_device_properties(device).total_memory
        where += f" ({total / gib:.1f} GiB)"
        if cfg.gpu_memory_fraction:
            share += f" ({cfg.gpu_memory_fraction * total / gib:.1f} GiB)"
        peak = f", peak allocated {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB"
        advice = (" or give each trial a larger GPU share (--gpus-per-trial: fewer trials per "
                  "GPU)")
    return OutOfGpuMemory(
        f"out of memory on {where} training batch_size={cfg.batch_size} at {image_size}x"
        f"{image_size} px with {share}{peak}: use a smaller batch_size (--set batch_size=N)"
        f"{advice}"
    )


def _train(cfg: TrialConfig, device: torch.device, cache, report, resume_from) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffling and augmentation

    data = DeviceData(cache, device)
    # Resumed, the checkpoint holds the weights and input statistics: nothing to fetch.
    model = build_model(cfg, load_encoder_weights=resume_from is None).to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    scheduler = _scheduler(cfg, optimizer)

    # rrr_abs's unit (`measure_rrr_scale`); 1 for every other loss set.
    scaled = LOSS_SETS[cfg.loss_set].input_gradient == "log_probs"
    ckdir = Path(cfg.checkpoint_dir or tempfile.mkdtemp(prefix="gazetune-trial-")).absolute()
    start, best_auc, best_epoch, scale = 0, -math.inf, 0, 1.0
    if resume_from is not None:
        start, best_auc, best_epoch, scale = _resume(Path(resume_from), ckdir, model,
                                                     optimizer, scheduler, gen)
    else:
        train_idx = torch.as_tensor(data.indices("train"), device=device)
        if scaled:
            # Before the calibration, which resets the running statistics this forward moves.
            scale = measure_rrr_scale(model, data, train_idx[: cfg.batch_size], cfg)
        calibrate_batchnorm(model, (data.images[train_idx[i : i + cfg.batch_size]]
                                    for i in range(0, min(len(train_idx), 4 * cfg.batch_size),
                                                   cfg.batch_size)))

    report = report or _print_report
    metrics: dict[str, float] = {}
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        metrics = train_one_epoch(model, data, optimizer, cfg, gen, epoch, scale)
        if scaled:
            metrics["train/rrr_scale"] = scale
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        t1 = time.perf_counter()
        val, _ = evaluate(model, data, data.indices("val"), cfg, prefix="val")
        metrics.update(val)
        metrics.update(counterexample_auc(model, data, data.indices("val"), cfg, prefix="val"))
        metrics["train/seconds"] = t1 - t0
        metrics["val/seconds"] = time.perf_counter() - t1
        # The first epoch is always a checkpoint, even when the validation split is too small
        # to hold every class (AUC undefined: NaN).
        score = metrics[cfg.metric]
        is_best = best_epoch == 0 or score > best_auc
        figures = {}
        if is_best:
            # NaN (a class missing from validation) must not block every later epoch.
            best_auc = score if math.isfinite(score) else -math.inf
            best_epoch = epoch + 1
            # The cache's input hash lets `gazetune evaluate --cache` refuse other data; the
            # image size is the input size of the model that `trainable.inference` rebuilds.
            checkpoint.save_best(ckdir, _cpu_state(model), cfg.to_dict(),
                                 {**metrics, "epoch": epoch + 1,
                                  "cache_input_hash": cache.manifest.get("input_hash"),
                                  "image_size": int(cache.images.shape[-1])})
            if cfg.figures:
                figures = draw_figures(model, data, cfg, ckdir / "figures")
        metrics["epoch_seconds"] = time.perf_counter() - t0
        checkpoint.save_torch(
            {
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "best_auc": best_auc,
                "best_epoch": best_epoch,
                "rrr_scale": scale,
                "rng": {"torch": torch.get_rng_state(), "loop": gen.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            },
            ckdir / "state.pt",
        )
        report(EpochReport(epoch + 1, dict(metrics), ckdir, is_best, figures))
    return {**metrics, f"best/{cfg.metric}": best_auc, "best_epoch": best_epoch,
            "checkpoint_dir": str(ckdir)}


class DeviceData:
    """The whole cache as tensors on the training device (it is ~100 MB at 224 px)."""

    def __init__(self, cache, device: torch.device):
        def to(array):
            return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device)

        self.images = to(cache.images).unsqueeze(1)  # [N, 1, S, S]
        self.heatmaps = to(cache.heatmaps).unsqueeze(1)  # [N, 1, S, S]
        self.labels = to(cache.labels)  # [N, 3] one-hot
        self.fixations = np.asarray(cache.fixations)  # [N, S, S] counts, for NSS on the host
        self.split = np.asarray(cache.split)
        self.cache = cache

    def indices(self, name: str) -> np.ndarray:
        return np.asarray(self.cache.indices(name))


def compute_terms(model, x, y, gaze, cfg: TrialConfig, natural: torch.Tensor | None = None,
                  rrr_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The named loss terms of one batch (train-mode forward first, then any saliency map).

    `natural`: the batch's images before their counterexamples were made (`x`), when the
    config weighs a consistency term: they go through the same train-mode forward as `x`
    (one batch, so BatchNorm sees both kinds of image), only their class probabilities enter
    the loss, through the consistency term. `rrr_scale`: rrr_abs's gradient ratio at
    initialisation (`measure_rrr_scale`), which multiplies `rrr_lambda`.
    """
    from trainable.fast_conv import fast_grouped_convs
    from trainable.generators import saliency
    from trainable.losses import consistency, loss_terms, reference_gaze_target

    spec = LOSS_SETS[cfg.loss_set]
    b = x.shape[0]
    own_gradient = spec.input_gradient == "log_probs"
    with fast_grouped_convs(model) if own_gradient else nullcontext():
        if own_gradient:
            x = x.detach().requires_grad_(True)
        mask, logits = split_outputs(model(x if natural is None else torch.cat([x, natural])))
        input_grad = None
        if own_gradient:
            # Ross et al.'s gradient of the summed log-probabilities, here of every sigmoid
            # output, taken through this train-mode forward: a map pass in eval mode let the
            # network escape the penalty by saturating its eval-mode outputs while its
            # train-mode ones stayed sensible (measured). A negative class's log sigma(z) keeps
            # a gradient of 1 in z however far the classification pushes z down, so the
            # outputs cannot saturate the penalty away either. (Train-mode BatchNorm couples
            # the images of the batch: an image's gradient holds a small share from the
            # others' outputs.)
            score = torch.nn.functional.logsigmoid(logits[:b].float()).sum()
            input_grad = torch.autograd.grad(score, x, create_graph=True)[0]
    if natural is not None:
        natural_logits, logits = logits[b:], logits[:b]
        mask = None if mask is None else mask[:b]
    gen_map = None
    # The map passes run after the train-mode forward: they read the BatchNorm running
    # statistics that forward has just updated, and nothing mutates them afterwards.
    if spec.uses_map:
        images, target = map_batch(x, y, cfg)
        gen_map = saliency(model, images, target, cfg.generator,
                           create_graph=spec.trains_through_map)
    elif spec.input_gradient == "map":
        images, target = map_batch(x, y, cfg)
        input_grad = saliency(model, images, target, "gradient", create_graph=True)
    if applies("gaze_target", cfg.loss_set) and cfg.gaze_target == "reference":
        # After augmentation: a heatmap warped with zero fill, then rendered, gets the grey of
        # "no gaze" outside the image, as a rendered zero would.
        gaze = reference_gaze_target(gaze)
    terms = loss_terms(cfg.loss_set, logits=logits, labels=y, mask_logits=mask, gen_map=gen_map,
                       gaze=gaze, input_grad=input_grad, r=cfg.r, weight=cfg.loss_weight,
                       rrr_lambda=cfg.rrr_lambda * rrr_scale, seg_loss=cfg.seg_loss)
    if natural is not None:
        terms["consistency"] = consistency(logits, natural_logits)
        terms["total"] = terms["total"] + cfg.counterexample_consistency * terms["consistency"]
    return terms


def map_batch(x, y, cfg: TrialConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and target classes of the saliency maps a step constrains.

    `map_outputs=true_class`: one map per image, of its label's output. `all`: one map per
    image and class, the batch stacked K times class-major (class 0 for every image, then
    class 1, ...) in one saliency call; maps are taken with eval-mode normalisation, so each
    is the map of its own image and stacking changes none of them.

    Why every output's own map rather than the map of one summed score (such as Ross et al.'s
    summed log-probabilities): the classes are independent sigmoids, each scored one-vs-rest,
    and the gradient of a sum can cancel between outputs (evidence for one class and against
    another in the same region), so a summed map that agrees with the gaze leaves each output
    free to look elsewhere. The price: the map part of a step costs K times as much.

    Shape:
        x [B, C, H, W], y [B, K] one-hot -> images [B or K * B, C, H, W], target [B or K * B].
    """
    if not applies("map_outputs", cfg.loss_set) or cfg.map_outputs == "true_class":
        return x, y.argmax(1)
    classes = torch.arange(y.shape[1], device=y.device)
    return x.repeat(y.shape[1], 1, 1, 1), classes.repeat_interleave(x.shape[0])


def measure_rrr_scale(model, data: DeviceData, idx: torch.Tensor,
                      cfg: TrialConfig) -> float:
    """rrr_abs's unit: the norm of the classification term's parameter gradient over that of
    the penalty's, on the images `idx` (the first training batch, as they are) with the
    initial weights.

    The penalty's scale follows the network: on the shortcut benchmark's ResNet its gradient
    was ~10^3 times the classification's at initialisation, so Ross et al.'s lambda ~10^3 (for
    MNIST networks) does not transfer, and rrr_lambda = 1 means the same pull for every
    encoder and image size. Measured once and kept in the checkpoint: rescaled every step, the
    weight would fall as the penalty does its work.
    """
    x, gaze, y = data.images[idx], data.heatmaps[idx], data.labels[idx]
    terms = compute_terms(model, x, y, gaze, cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def norm(term: str) -> float:
        grads = torch.autograd.grad(terms[term], params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.square().sum()) for g in grads if g is not None))

    cls, penalty = norm("cls"), norm(LOSS_SETS[cfg.loss_set].terms[0])
    model.zero_grad(set_to_none=True)
    # A penalty without gradient (no gaze region outside, a constant network) leaves the unit 1.
    return cls / penalty if penalty > 0 and math.isfinite(cls / penalty) else 1.0


def cls_weight(cfg: TrialConfig, progress: float) -> float:
    """The classification term's weight after `progress` epochs (`cls_ramp`): the shortcut of
    the gaze benchmark is learnt in one or two epochs, before a gaze term whose weight is
    constant from step 0 has shaped anything."""
    if cfg.cls_ramp == 0 or not applies("cls_ramp", cfg.loss_set):
        return 1.0
    return min(1.0, progress / cfg.cls_ramp)


def train_one_epoch(model, data: DeviceData, optimizer, cfg: TrialConfig, gen, epoch: int,
                    rrr_scale: float = 1.0) -> dict:
    model.train()
    idx = torch.from_numpy(data.indices("train"))
    order = idx[torch.randperm(len(idx), generator=gen)].to(data.images.device)
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    steps = math.ceil(len(order) / cfg.batch_size)
    for step, start in enumerate(range(0, len(order), cfg.batch_size)):
        b = order[start : start + cfg.batch_size]
        if len(b) < 2:  # a 1-image batch breaks train-mode BatchNorm
            continue
        x, gaze, y = data.images[b], data.heatmaps[b], data.labels[b]
        if cfg.augment:
            x, gaze = random_affine(x, gaze, gen)
        natural = None
        if cfg.counterexample != "none":
            if cfg.counterexample_consistency > 0:
                natural = x
            x = gaze_counterexamples(x, gaze, gen, cfg.counterexample, cfg.counterexample_p,
                                     cfg.counterexample_region, cfg.counterexample_outline)
        if x.is_cuda and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            natural = None if natural is None else natural.contiguous(
                memory_format=torch.channels_last)
        with _autocast(cfg, x.device):
            terms = compute_terms(model, x, y, gaze, cfg, natural, rrr_scale)
            ramp = cls_weight(cfg, epoch + step / steps)
            if ramp < 1:  # the logged cls stays the unweighted term
                terms["total"] = terms["total"] - (1 - ramp) * terms["cls"]
        values = {k: float(v.detach()) for k, v in terms.items()}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise DivergedError(
                f"training diverged at epoch {epoch + 1}, step {step + 1}: loss term(s) "
                f"{', '.join(f'{k}={values[k]}' for k in bad)} (lr={cfg.lr:g})"
            )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        for k, v in values.items():
            sums[k] += v * len(b)
        seen += len(b)
    return {("train/loss" if k == "total" else f"train/{k}"): v / max(seen, 1)
            for k, v in sums.items()}


def predict(model, data: DeviceData, idx: np.ndarray, cfg: TrialConfig):
    """(class probabilities [n, 3], mask probabilities [n, S, S] or None), eval mode."""
    device = data.images.device
    batches = (data.images[torch.as_tensor(idx[start : start + cfg.batch_size], device=device)]
               for start in range(0, len(idx), cfg.batch_size))
    return predict_batches(model, batches, cfg, device)


def predict_batches(model, batches: Iterable[torch.Tensor], cfg: TrialConfig,
                    device: torch.device):
    """`predict` of image batches ([b, 1, S, S] on `device`, the model's): the one inference of
    the project. Validation, `gazetune evaluate` and the logged MLflow model
    (`trainable.inference`) all run it, so their probabilities agree: independent sigmoids of
    the logits (one-vs-rest, as the AUCs score them)."""
    model.eval()
    probs, masks = [], []
    with torch.no_grad(), _autocast(cfg, device):
        for x in batches:
            mask, logits = split_outputs(model(x))
            probs.append(torch.sigmoid(logits.float()).cpu())
            if mask is not None:
                masks.append(torch.sigmoid(mask.float())[:, 0].cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, 3), np.float32)
    return p, (torch.cat(masks).numpy() if masks else None)


def explain(model, data: DeviceData, idx: np.ndarray, cfg: TrialConfig, method: str | None = None,
            target: np.ndarray | None = None) -> np.ndarray:
    """|saliency| summed over channels [n, S, S] for the true class (or `target`)."""
    device = data.images.device

    def batches():
        for start in range(0, len(idx), cfg.batch_size):
            b = torch.as_tensor(idx[start : start + cfg.batch_size], device=device)
            t = (data.labels[b].argmax(1) if target is None
                 else torch.as_tensor(target[start : start + cfg.batch_size], device=device))
            yield data.images[b], t

    maps = explain_batches(model, batches(), cfg, device, method)
    return maps if len(maps) else np.zeros((0,) + data.images.shape[2:], np.float32)


def explain_batches(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    cfg: TrialConfig, device: torch.device,
                    method: str | None = None) -> np.ndarray:
    """`explain` of (images [b, 1, S, S], target class [b]) batches on `device`: |saliency of
    `method` (default: the config's generator)| summed over channels, [n, S, S]."""
    from trainable.generators import saliency

    was_training = model.training
    model.eval()
    maps = []
    try:
        for x, t in batches:
            with _autocast(cfg, device):
                s = saliency(model, x, t, method or cfg.generator)
            maps.append(s.detach().float().abs().sum(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(maps).numpy() if maps else np.zeros((0, 0, 0), np.float32)


def evaluate(model, data: DeviceData, idx: np.ndarray, cfg: TrialConfig, prefix: str):
    """Bootstrap AUCs and map agreement on `idx`; returns (metrics, predictions)."""
    from trainable.metrics import bootstrap_auc, map_agreement

    probs, masks = predict(model, data, idx, cfg)
    y = data.cache.labels[idx]
    metrics = {}
    for name, (auc, lo, hi) in bootstrap_auc(y, probs, CLASS_NAMES, n_boot=cfg.n_boot or None,
                                             seed=cfg.seed, protocol=cfg.boot_protocol).items():
        metrics.update({f"{prefix}/auc/{name}": auc, f"{prefix}/auc/{name}/lo": lo,
                        f"{prefix}/auc/{name}/hi": hi})
    gaze = data.cache.heatmaps[idx].astype(np.float32)
    fix = data.fixations[idx]
    maps = explain(model, data, idx, cfg)
    for kind, pred in (("map", maps), ("mask", masks)):
        if pred is not None:
            for k, v in map_agreement(pred, gaze, fix).items():
                metrics[f"{prefix}/{kind}/{k}"] = float(v)
    return metrics, {"probs": probs, "maps": maps, "masks": masks, "labels": y}


def counterexample_auc(model, data: DeviceData, idx: np.ndarray, cfg: TrialConfig,
                       prefix: str) -> dict[str, float]:
    """AUCs on gaze counterexamples of the images `idx`: outside each image's gaze region,
    the same pixels of another of these images (`trainable.augment.gaze_counterexamples`,
    swap, with a fixed draw: the same images at every epoch).

    A model that reads the images where the radiologist looked keeps its AUC here; one that
    reads what no one looked at (a marker that correlates with the class in the training and
    validation data) meets another image's evidence there and loses it, so selecting epochs
    (and trials) by this score prefers the first without ever seeing the test split.
    Keys `<prefix>/gaze_auc/<name>[/lo|/hi]`.
    """
    from trainable.metrics import bootstrap_auc

    if len(idx) < 2:
        return {}
    device = data.images.device
    rows = torch.as_tensor(idx, device=device)
    swapped = gaze_counterexamples(data.images[rows], data.heatmaps[rows],
                                   torch.Generator().manual_seed(0), "swap")
    probs, _ = predict_batches(model, swapped.split(cfg.batch_size), cfg, device)
    out = {}
    for name, (auc, lo, hi) in bootstrap_auc(
            data.cache.labels[idx], probs, CLASS_NAMES, n_boot=cfg.n_boot or None,
            seed=cfg.seed, protocol=cfg.boot_protocol).items():
        out.update({f"{prefix}/gaze_auc/{name}": auc, f"{prefix}/gaze_auc/{name}/lo": lo,
                    f"{prefix}/gaze_auc/{name}/hi": hi})
    return out


def draw_figures(model, data: DeviceData, cfg: TrialConfig, folder: Path) -> dict[str, Path]:
    """Panels input | generator map | gaze | mask for correctly classified validation images."""
    from trainable.figures import heatmap_panels, save_figure

    idx = data.indices("val")
    if len(idx) == 0:
        return {}
    probs, _ = predict(model, data, idx, cfg)
    y = data.cache.labels[idx].argmax(1)
    chosen = []
    for c in range(len(CLASS_NAMES)):
        of_class = np.flatnonzero(y == c)
        right = of_class[probs[of_class].argmax(1) == c]
        chosen.extend((right if len(right) else of_class)[: cfg.figures].tolist())
    sel = idx[chosen]
    _, masks = predict(model, data, sel, cfg)
    titles = [f"{CLASS_NAMES[y[i]]} (p={probs[i, y[i]]:.2f})" for i in chosen]
    fig = heatmap_panels(data.cache.images[sel].astype(np.float32), explain(model, data, sel, cfg),
                         data.cache.heatmaps[sel].astype(np.float32), masks, titles=titles)
    path = folder / f"val_{cfg.generator}.png"
    save_figure(fig, path)
    return {path.name: path}


def choose_device(cfg: TrialConfig) -> torch.device:
    """The device of `cfg.device` ("auto": CUDA when available), with the process's GPU memory
    capped at `cfg.gpu_memory_fraction` when one is set.

    Raises:
        ConfigError: CUDA asked for but not available.
    """
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' = {cfg.device!r}: CUDA is not available")
        if cfg.gpu_memory_fraction:
            # Ray's fractional GPUs only schedule; the cap keeps packed trials from starving
            # each other of memory.
            torch.cuda.set_per_process_memory_fraction(cfg.gpu_memory_fraction, device)
    return device


def _autocast(cfg: TrialConfig, device: torch.device):
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _optimizer(cfg: TrialConfig, model) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler(cfg: TrialConfig, optimizer):
    """Per-epoch learning-rate schedule."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "cyclic":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, CyclicFactor(cfg.cyclic_step, cfg.lr))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class CyclicFactor:
    """The dataset authors' `cyclical_lr(step_sz, min_lr=lr, max_lr=1, mode='triangular2')`.

    LambdaLR multiplies the base rate by this factor, so the effective rate oscillates between
    lr² and lr with peaks halving every cycle (their published training code), stepped per epoch.
    """

    def __init__(self, step: int, lr: float):
        self.step, self.min = step, lr

    def __call__(self, it: int) -> float:
        cycle = math.floor(1 + it / (2 * self.step))
        x = abs(it / self.step - 2 * cycle + 1)
        return self.min + (1 - self.min) * max(0.0, 1 - x) / 2 ** (cycle - 1)


def _resume(src: Path, ckdir: Path, model, optimizer, scheduler, gen
            ) -> tuple[int, float, int, float]:
    if src.absolute() != ckdir:
        shutil.copytree(src, ckdir, dirs_exist_ok=True)
    state = checkpoint.load_torch(ckdir / "state.pt")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    gen.set_state(state["rng"]["loop"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["epoch"], state["best_auc"], state["best_epoch"], state.get("rrr_scale", 1.0)


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _print_report(rep: EpochReport) -> None:
    m = rep.metrics
    print(
        f"epoch {rep.epoch}: train/loss {m.get('train/loss', float('nan')):.4f}  "
        f"val/auc/mean {m[METRIC]:.3f} [{m[METRIC + '/lo']:.3f}, {m[METRIC + '/hi']:.3f}]  "
        + "  ".join(f"{c} {m[f'val/auc/{c}']:.3f}" for c in CLASS_NAMES)
        + f"  ({m['epoch_seconds']:.1f} s){'  *best' if rep.is_best else ''}",
        flush=True,
    )
