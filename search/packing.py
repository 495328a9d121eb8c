"""How many trials share one GPU: the default `--gpus-per-trial` of a search.

One trial rarely fills a modern GPU (an efficientnet-b0 U-Net at 224 px, batch 32, uses 2.4 GiB
and about half the H200's compute), so a search packs several trials per GPU: four trials of a
quarter GPU gave 1.76x the images/s of one trial on an H200 (measured). The number
that fits depends on the image size, which is where a fixed share goes wrong: at 512 px a trial
needs about 5x the memory it needs at 224 px.

Ray schedules fractional GPUs by count, not by memory, so the share must be chosen from an
estimate. The estimate scales the measured baseline step with the pixels and the batch, times
the peak of a saliency-in-the-loop step (set1/set3 keep the map's graph: 1.5-2.5x the plain
step's peak memory, measured on CPU), plus each process's CUDA context.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

BASE_GIB = 2.4  # plain step, 224 px, batch 32, bf16 (measured)
SALIENCY_PEAK = 2.5  # set1/set3 peak memory / plain step's, the upper end measured
CONTEXT_GIB = 0.6  # CUDA context and allocator slack of each trial's process
USABLE = 0.85  # of the GPU's memory: fragmentation, the driver's own share
MAX_PER_GPU = 4  # the packing that was measured (1.76x); beyond it trials mostly wait

# GPU memory by the accelerator type Ray detects (resource "accelerator_type:<type>"); where a
# type comes in several sizes, the smallest, so that the estimate errs towards fewer trials.
# The names are Ray's (`ray.util.accelerators`).
GPU_MEMORY_GIB = {
    "B300": 288, "GB300": 288, "B200": 180, "GB200": 186, "H200": 141, "H100": 80, "H20": 96,
    "A100-80G": 80, "A100-40G": 40, "A100": 40, "L40S": 48, "RTX-PRO-6000": 96, "L4": 24,
    "A10G": 24, "V100": 16, "P100": 16, "T4": 16, "P4": 8, "K80": 12,
}
UNKNOWN_GPU_GIB = 16.0


def trial_memory_gib(image_size: int, batch_size: int) -> float:
    """Estimated peak GPU memory of one trial at this image size and batch size."""
    scale = (image_size / 224) ** 2 * batch_size / 32
    return BASE_GIB * SALIENCY_PEAK * scale + CONTEXT_GIB


def default_gpu_share(image_size: int, batch_size: int, gpu_memory_gib: float) -> float:
    """The GPU share of one trial: 1/n for the n trials that fit (1 to `MAX_PER_GPU`).

    A trial that does not fit even alone still gets the whole GPU: it fails with the trainable's
    out-of-memory message, which says to lower the batch size.
    """
    fits = math.floor(gpu_memory_gib * USABLE / trial_memory_gib(image_size, batch_size))
    return 1.0 / max(1, min(MAX_PER_GPU, fits))


def smallest_gpu_memory_gib(nodes: Iterable[Mapping]) -> float | None:
    """GPU memory of the smallest GPU among Ray's nodes (`ray.nodes()`), None without GPUs.

    A GPU of a type not listed in `GPU_MEMORY_GIB` counts as `UNKNOWN_GPU_GIB`.
    """
    sizes = []
    for node in nodes:
        resources = node.get("Resources", {})
        if not node.get("Alive", True) or resources.get("GPU", 0) <= 0:
            continue
        types = [key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
        sizes += [GPU_MEMORY_GIB.get(t.upper(), UNKNOWN_GPU_GIB) for t in types] or \
            [UNKNOWN_GPU_GIB]
    return min(sizes) if sizes else None
