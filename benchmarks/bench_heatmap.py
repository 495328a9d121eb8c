"""Time the direct static heatmap against the full-resolution reference (3000x2500 -> 224 px).

    python benchmarks/bench_heatmap.py [--repeats 3]

Prints both times (best of the repeats), their ratio and the largest absolute difference.
Both run with one BLAS thread, as in `prepare`'s worker processes (a threaded BLAS makes the
direct map's tiny matrix product 10-100x slower on a busy machine).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from trainable.data.heatmaps import reference_static_heatmap, static_heatmap

SHAPE, OUT, SIGMA, FIXATIONS = (3000, 2500), (224, 224), 150.0, 45  # a real release's scale


def best_time(function, repeats: int) -> tuple[float, np.ndarray]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    height, width = SHAPE
    points = np.stack([rng.normal(width / 2, width / 6, FIXATIONS).clip(0, width - 1),
                       rng.normal(height / 2, height / 6, FIXATIONS).clip(0, height - 1)], 1)
    points = points.astype(int)
    with threadpool_limits(1):
        direct_s, direct = best_time(lambda: static_heatmap(points, SHAPE, SIGMA, OUT), 20)
        reference_s, reference = best_time(
            lambda: reference_static_heatmap(points, SHAPE, SIGMA, OUT), args.repeats
        )
    print(f"image {height}x{width}, {FIXATIONS} fixations, sigma {SIGMA:g}, output {OUT}")
    print(f"reference (full-res gaussian_filter + resize): {reference_s * 1e3:9.1f} ms")
    print(f"direct (at output size):                        {direct_s * 1e3:9.2f} ms")
    print(f"speed-up: {reference_s / direct_s:.0f}x; max |difference|: "
          f"{np.abs(direct - reference).max():.4f}")


if __name__ == "__main__":
    main()
