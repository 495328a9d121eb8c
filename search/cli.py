"""The `gazetune` command line (also `python -m search`).

Each subcommand parses its arguments here and calls one plain function; heavy imports (torch,
Ray, MLflow) happen inside the handlers so `gazetune --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _synth(args) -> int:
    from trainable.data.synthetic import synthesize

    synthesize(
        args.out,
        n_images=args.images,
        seed=args.seed,
        real_size=args.real_size,
        shortcut=args.shortcut,
        subtlety=args.subtlety,
    )
    return 0


def _prepare(args) -> int:
    from trainable.data.cache import prepare

    summary = prepare(
        egd_root=args.egd_root,
        mimic_root=args.mimic_root,
        cache=args.cache,
        size=args.size,
        subset=args.subset,
        on_error=args.on_error,
        workers=args.workers,
        sigma=args.sigma,
    )
    return 1 if (summary.skipped and args.on_error == "fail") else 0


def _train(args) -> int:
    from trainable.config import ConfigError
    from trainable.loop import parse_overrides

    try:
        config = parse_overrides(args.overrides)
    except ConfigError as err:
        print(f"gazetune train: {err}", file=sys.stderr)
        return 2
    from search.tracking import train_logged

    train_logged(config, experiment=args.experiment, tracking_uri=args.tracking_uri)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gazetune",
        description="Hyperparameter search for saliency-in-the-loop chest X-ray classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in the EGD-CXR/MIMIC-CXR layout")
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-size", action="store_true",
                   help="about 3000x2500 pixels like MIMIC-CXR (default: a few hundred a side)")
    p.add_argument("--shortcut", type=float, default=0.0,
                   help="strength in [0, 1] of a label-correlated marker in train/val (not test)")
    p.add_argument("--subtlety", type=float, default=0.0,
                   help="0 = clear findings, towards 1 = faint findings")
    p.set_defaults(func=_synth)

    p = sub.add_parser("prepare", help="decode DICOMs and gaze once into the training cache")
    p.add_argument("--egd-root", type=Path, required=True,
                   help="folder with master_sheet.csv and fixations.csv")
    p.add_argument("--mimic-root", type=Path, required=True,
                   help="folder holding files/pXX/... (the MIMIC-CXR 2.0.0 root)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--subset", type=Path, default=None,
                   help="a filenames.csv naming the images to keep (Watanabe et al.'s 1,017)")
    p.add_argument("--cache", type=Path, default=Path("cache"))
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: all cores)")
    p.add_argument("--sigma", type=float, default=150.0,
                   help="gaze blur in original pixels (the reference: 150 for ~3000 px images; "
                        "use about 20 for the default synthetic images of a few hundred px)")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train one configuration (no Ray), logged to MLflow")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--experiment", default="train")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(func=_train)

    _add_service_commands(sub)
    return parser


def _add_service_commands(sub) -> None:
    """search / resume (the service), export / evaluate / demo (reports), bench."""
    from search import bench_command, commands, report_commands

    commands.add_to(sub)
    report_commands.add_to(sub)
    bench_command.add_to(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # user-facing errors of our own carry a clear message
        from trainable.errors import GazetuneError

        if isinstance(err, GazetuneError):
            print(f"gazetune {args.command}: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
