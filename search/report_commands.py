"""The reporting subcommands: `gazetune export`, `gazetune evaluate` and `gazetune demo`.

Parsing only; the work is in `search.export`, `search.evaluate` and `search.demo`, imported
when a command runs so that `gazetune --help` stays instant.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search import demo  # light: its heavy imports happen when the demo runs


def add_to(subparsers) -> None:
    """Add export, evaluate and demo to the `gazetune` parser."""
    p = subparsers.add_parser("export", help="write reports/NAME/ from a study's MLflow runs")
    p.add_argument("name", help="the study name (= the MLflow experiment)")
    p.add_argument("--top-k", type=int, default=10,
                   help="trials listed in best_configs.json (default: 10)")
    _add_report_options(p)
    p.set_defaults(func=_export)

    p = subparsers.add_parser("evaluate",
                              help="evaluate a study's best checkpoint on the test split")
    p.add_argument("name", help="the study name (= the MLflow experiment)")
    p.add_argument("--run", dest="run_id", default=None,
                   help="a trial's MLflow run id (default: the best validation AUC)")
    p.add_argument("--protocol", choices=("stratified", "paper"), default="stratified",
                   help="bootstrap: stratified (2,000 resamples) or the paper's (30 of 55%%)")
    p.add_argument("--n-boot", type=int, default=0,
                   help="bootstrap resamples (default: the protocol's)")
    p.add_argument("--cache", type=Path, default=None,
                   help="prepared cache to test on (default: the one the trial trained on)")
    _add_report_options(p)
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser("demo", help="synthetic data, a small search, its report and test "
                                           "evaluation (under 10 minutes on a 2-core CPU)")
    p.add_argument("--workdir", type=Path, default=Path("."),
                   help="where the data, cache, MLflow store, Tune state and report go")
    p.add_argument("--images", type=int, default=demo.IMAGES,
                   help="synthetic images (default: %(default)s)")
    p.add_argument("--trials", type=int, default=demo.TRIALS,
                   help="trials of the search (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=demo.EPOCHS,
                   help="epochs of a trial ASHA keeps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic release and of the search's sampler")
    p.set_defaults(func=_demo)


def _add_report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow: http://HOST:PORT or sqlite:///PATH (default: ./mlflow.db)")
    p.add_argument("--reports", type=Path, default=Path("reports"),
                   help="folder of the reports (default: ./reports)")


def _export(args) -> int:
    from search.export import export

    export(args.name, tracking_uri=args.tracking_uri, reports=args.reports, top_k=args.top_k)
    return 0


def _evaluate(args) -> int:
    from search.evaluate import evaluate_study

    evaluate_study(args.name, run_id=args.run_id, protocol=args.protocol, cache=args.cache,
                   tracking_uri=args.tracking_uri, reports=args.reports, n_boot=args.n_boot)
    return 0


def _demo(args) -> int:
    demo.run_demo(args.workdir, images=args.images, trials=args.trials, epochs=args.epochs,
                  seed=args.seed)
    return 0
