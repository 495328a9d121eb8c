"""Bootstrap AUC: the vectorised `bootstrap_auc` against a loop over scikit-learn.

Run: `python benchmarks/bench_metrics.py [--n-boot 2000] [--repeats 5]`. Prints the machine, the
time of `bootstrap_auc` (2,000 resamples x 3 classes x 108 images, the dataset authors' test
split size), the time of `roc_auc_score` looped over the same resamples, their ratio, and the
largest difference between the two per-resample AUCs (target: >= 20x and equal).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from trainable.config import CLASS_NAMES
from trainable.metrics import bootstrap_auc, multiplicity, resample_indices, weighted_auc

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from machine import cpu_name

COUNTS = (30, 42, 36)  # class counts of the 108-image test split


def synthetic_predictions(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One-hot labels and sigmoid-like scores with some signal, rounded to 3 decimals (ties)."""
    rng = np.random.default_rng(seed)
    y = np.eye(3)[np.repeat(np.arange(3), COUNTS)]
    logits = 1.5 * y + rng.normal(size=y.shape)
    return y, np.round(1 / (1 + np.exp(-logits)), 3)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(n_boot: int = 2000, repeats: int = 5) -> dict[str, float]:
    """Seconds of `bootstrap_auc` (best of `repeats`) and of the scikit-learn loop over the same
    resamples, and the largest difference between their per-resample AUCs."""
    y, s = synthetic_predictions()
    indices = resample_indices(y, n_boot=n_boot, seed=0)
    fast = best_time(lambda: bootstrap_auc(y, s, CLASS_NAMES, n_boot=n_boot, seed=0), repeats)
    start = time.perf_counter()
    reference = np.array([[roc_auc_score(y[i, c], s[i, c]) for c in range(3)] for i in indices])
    slow = time.perf_counter() - start
    diff = np.abs(weighted_auc(y, s, multiplicity(indices, len(y))) - reference).max()
    return {"fast": fast, "slow": slow, "diff": float(diff), "images": len(y)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    args = parser.parse_args(argv)

    m = measure(args.n_boot, args.repeats)
    fast, slow, diff = m["fast"], m["slow"], m["diff"]
    print(f"machine: {cpu_name()} ({platform.machine()}), Python {platform.python_version()}")
    print(f"task: {args.n_boot} resamples x {len(CLASS_NAMES)} classes x {m['images']} images")
    print(f"bootstrap_auc (best of {args.repeats}):   {fast * 1e3:9.1f} ms")
    print(f"roc_auc_score loop, same resamples: {slow * 1e3:9.1f} ms")
    print(f"ratio: {slow / fast:.0f}x   (target >= 20x)")
    print(f"max |difference| per resample AUC: {diff:.1e}   (target <= 1e-12)")
    return 0 if diff <= 1e-12 and slow / fast >= 20 else 1


if __name__ == "__main__":
    raise SystemExit(main())
