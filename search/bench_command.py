"""`gazetune bench`: the performance ratios (benchmarks/bench.py), measured in one run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# benchmarks/ is not an installed package: the command runs it from the source checkout.
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def add_to(subparsers) -> None:
    """Add `gazetune bench` to the `gazetune` parser."""
    p = subparsers.add_parser("bench", help="measure step-time ratios of the loss sets, data "
                                            "handling, metrics and packing in one run")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one repeat, small validation set, no compile or packing")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory format (CUDA)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-compile", action="store_true",
                   help="skip torch.compile (its compile takes about 10 min on a 2-core CPU)")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    import re

    from trainable.errors import GazetuneError

    for option, value, low, high in (("--size", args.size, 32, 4096), ("--batch", args.batch, 2,
                                     4096), ("--repeats", args.repeats, 1, 10_000),
                                     ("--threads", args.threads, 0, 4096)):
        if not low <= value <= high:
            raise GazetuneError(f"bench: {option} must be in [{low}, {high}], got {value}")
    if args.size % 32:
        raise GazetuneError(f"bench: --size must be a multiple of 32 (the U-Net halves it five "
                            f"times), got {args.size}")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise GazetuneError(f"bench: --device must be cpu, cuda or cuda:N, got {args.device!r}")
    if not BENCH.is_file():
        raise GazetuneError(f"gazetune bench needs the source checkout: {BENCH} not found")
    spec = importlib.util.spec_from_file_location("gazetune_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return bench.run(args)
