"""The service's subcommands: `gazetune search` and `gazetune resume`.

Parsing only; the work is in `search.service`, imported when a command runs so that
`gazetune --help` does not wait for Ray.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_to(subparsers) -> None:
    """Add the service's subcommands to the `gazetune` parser."""
    p = subparsers.add_parser("search", help="search with Ray Tune + Optuna + ASHA")
    p.add_argument("--name", default=None,
                   help="study name: Tune's folder and the MLflow experiment "
                        "(default: search-<date>-<time>)")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="from `gazetune prepare`")
    p.add_argument("--space", default="paper", help="search space: paper or extended")
    p.add_argument("--samples", type=int, default=16, help="number of trials")
    p.add_argument("--max-epochs", type=int, default=20, help="epochs of a trial ASHA keeps")
    p.add_argument("--grace-period", type=int, default=2,
                   help="epochs before ASHA may stop a trial")
    p.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPU cores Ray reserves for each trial (also its torch threads)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="a GPU fraction per trial, e.g. 0.25 packs four trials on a GPU "
                        "(default: as many trials per GPU as fit at the cache's image size, "
                        "up to four; 0 without GPUs)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: as many as the resources allow)")
    p.add_argument("--seed", type=int, default=0, help="seed of Optuna's sampler")
    p.add_argument("--paper-points", action="store_true",
                   help="run the paper's eight configurations first")
    p.add_argument("--set", dest="fixed", nargs="+", default=[], metavar="KEY=VALUE",
                   help="fixed trial settings, e.g. batch_size=16 n_boot=500")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a failing trial from its last checkpoint")
    _add_location_options(p)
    p.set_defaults(func=_search)

    p = subparsers.add_parser("resume", help="continue an interrupted search")
    p.add_argument("name", help="the study name given to `gazetune search`")
    _add_location_options(p)
    p.set_defaults(func=_resume)


def _add_location_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: a new local Ray instance)")
    p.add_argument("--storage", default="ray_results",
                   help="Tune's storage: a path (shared on a cluster) or a URI such as s3://...")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow: http://HOST:PORT or sqlite:///PATH (default: ./mlflow.db)")


def _search(args) -> int:
    from search.service import SearchSettings, parse_fixed, run_search

    settings = SearchSettings(
        name=time.strftime("search-%Y%m%d-%H%M%S") if args.name is None else args.name,
        space=args.space, samples=args.samples, max_epochs=args.max_epochs,
        grace_period=args.grace_period, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, seed=args.seed,
        paper_points=args.paper_points, fixed=parse_fixed(args.fixed),
        max_failures=args.max_failures, address=args.address, storage=args.storage,
        cache=str(args.cache), tracking_uri=args.tracking_uri,
    )
    return _report(run_search(settings))


def _resume(args) -> int:
    from search.service import resume_search

    return _report(resume_search(args.name, storage=args.storage,
                                 tracking_uri=args.tracking_uri, address=args.address))


def _report(summary) -> int:
    print(f"search {summary.name!r}: {summary.completed} trials finished, {summary.pruned} "
          f"pruned, {summary.failed} failed (Tune state: {summary.path})")
    if summary.best:
        best, m = summary.best, summary.best["metrics"]
        print(f"best: trial {best['trial_id']} (MLflow run {best['run_id']}), epoch "
              f"{best['epoch']}: val/auc/mean {m['val/auc/mean']:.3f} "
              f"[{m['val/auc/mean/lo']:.3f}, {m['val/auc/mean/hi']:.3f}]")
    if summary.interrupted:
        print(f"interrupted: `gazetune resume {summary.name}` continues it")
        return 130
    return 0 if summary.completed + summary.pruned else 1
