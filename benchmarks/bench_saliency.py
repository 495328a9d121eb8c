"""Saliency in the loop: the cost of a set1/set3 training step against a plain step.

Run: `python benchmarks/bench_saliency.py [--size 128] [--batch 4] [--repeats 5]`. Builds the
trial's network (smp U-Net, efficientnet-b0 encoder, encoder_weights=None, 1 channel, 3-class
head) and times, in one run and interleaved, a plain step (the baseline loss) and set1/set3
steps with a differentiable map from each generator, through the reference path (PyTorch's own
double backward of the depthwise convolutions) and the fast path (`trainable.fast_conv`). Prints
the device, the best and median step times and their ratios to the plain step (target
1: <= 3x on an H100/H200 at 224 px, bf16, batch 32; <= 2.5x on the 2-core CPU at 128 px, batch
4). On a shared machine the best time is the one least disturbed by other loads. On CUDA,
`--bf16` and `--channels-last` give the training loop's settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from trainable.generators import saliency
from trainable.loss_sets import LOSS_SETS
from trainable.losses import loss_terms

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from machine import device_name


def build(size: int, batch: int, device: torch.device, channels_last: bool):
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet("efficientnet-b0", encoder_weights=None, in_channels=1, classes=1,
                     aux_params={"classes": 3, "dropout": 0.2}).to(device)
    x = torch.rand(batch, 1, size, size, device=device)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, device=device),
                            torch.linspace(-1, 1, size, device=device), indexing="ij")
    gaze = torch.exp(-((xx - 0.3) ** 2 + yy**2) / 0.1).expand(batch, 1, size, size)
    labels = torch.eye(3, device=device)[torch.arange(batch, device=device) % 3]
    calibrate_batchnorm(model, x)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x, gaze, labels


def calibrate_batchnorm(model, x, passes: int = 3) -> None:
    """Running statistics of real activations, as after some training.

    At initialisation (mean 0, var 1) an eval-mode EfficientNet gives maps of about 1e-16, whose
    arithmetic is not the one a trial times.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None  # cumulative average
        m.reset_running_stats()
    with torch.no_grad():
        for _ in range(passes):
            model.train()(torch.rand_like(x))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def make_step(model, x, gaze, labels, loss_set, generator, fast, bf16):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    target = labels.argmax(1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            mask, logits = model(x)
            gen_map = None
            if generator:
                gen_map = saliency(model, x, target, generator, create_graph=True, fast=fast)
            terms = loss_terms(loss_set, logits=logits, labels=labels, mask_logits=mask,
                               gen_map=gen_map, gaze=gaze)
        terms["total"].backward()
        optimizer.step()

    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# The loss sets whose step differentiates through the map: set1, set3.
MAP_TRAINED = tuple(name for name, spec in LOSS_SETS.items() if spec.trains_through_map)
STEP_NAMES = ("plain (baseline)",) + tuple(
    f"{loss_set} {generator} {path}"
    for loss_set in MAP_TRAINED
    for generator in ("guided_backprop", "deconvnet")
    for path in ("slow", "fast"))


def measure_steps(size: int, batch: int, repeats: int, device: torch.device, bf16: bool = False,
                  channels_last: bool = False, slow: bool = True) -> dict[str, list[float]]:
    """Seconds of each step in `STEP_NAMES` (without the slow ones unless `slow`), `repeats`
    interleaved times after one warm-up."""
    model, x, gaze, labels = build(size, batch, device, channels_last)
    configs = {"plain (baseline)": ("baseline", None, True)}
    for name in STEP_NAMES[1:]:
        loss_set, generator, path = name.split()
        if slow or path == "fast":
            configs[name] = (loss_set, generator, path == "fast")
    steps = {name: make_step(model, x, gaze, labels, *config, bf16)
             for name, config in configs.items()}
    for step in steps.values():  # warm-up: allocator, kernels, BN running statistics
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so that load from elsewhere hits all alike
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return times


def print_steps(times: dict[str, list[float]]) -> None:
    """The table of best/median step times and their ratios to the plain step."""
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    plain = "plain (baseline)"
    print(f"{'step':<30} {'best ms':>8} {'median ms':>10} {'x plain best':>13} {'median':>7}")
    for name in times:
        print(f"{name:<30} {1e3 * best[name]:>8.0f} {1e3 * median[name]:>10.0f} "
              f"{best[name] / best[plain]:>13.2f} {median[name] / median[plain]:>7.2f}")
    for loss_set in MAP_TRAINED:
        for generator in ("guided_backprop", "deconvnet"):
            slow, fast = f"{loss_set} {generator} slow", f"{loss_set} {generator} fast"
            if slow not in times:
                continue
            print(f"fast path speed-up, {loss_set} {generator}: {best[slow] / best[fast]:.2f}x "
                  f"(best), {median[slow] / median[fast]:.2f}x (median)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    times = measure_steps(args.size, args.batch, args.repeats, device, args.bf16,
                          args.channels_last)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    print(f"efficientnet-b0 U-Net, {args.size} px, batch {args.batch}, bf16 {args.bf16}, "
          f"channels_last {args.channels_last}; {args.repeats} interleaved steps each")
    print_steps(times)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
