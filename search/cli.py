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
        force=args.force,
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
    from search.names import check_name
    from trainable.config import TrialConfig
    from trainable.loop import check_inputs, parse_overrides

    check_name(args.experiment, "--experiment")
    config = parse_overrides(args.overrides)
    check_inputs(TrialConfig.from_dict(config))  # before MLflow opens a run
    from search.tracking import train_logged

    train_logged(config, experiment=args.experiment, tracking_uri=args.tracking_uri)
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the help already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "(default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: `--help` shows each option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def subcommand(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose description repeats its one-line help."""
    return sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                          **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gazetune",
        description="Hyperparameter search for saliency-in-the-loop chest X-ray classifiers.",
        epilog="Start with `gazetune demo`: synthetic data, a small search, its report.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)

    p = subcommand(sub, "synth", "write a synthetic dataset in the EGD-CXR/MIMIC-CXR layout")
    p.add_argument("out", type=Path, help="an empty or new folder for egd-cxr/ and mimic-cxr/")
    p.add_argument("--images", type=int, default=200,
                   help="images, balanced over Normal, CHF and pneumonia")
    p.add_argument("--seed", type=int, default=0, help="the only source of randomness")
    p.add_argument("--real-size", action="store_true",
                   help="about 3000x2500 pixels like MIMIC-CXR (default: a few hundred a side)")
    p.add_argument("--shortcut", type=float, default=0.0,
                   help="strength in [0, 1] of a label-correlated marker in train/val (not test)")
    p.add_argument("--subtlety", type=float, default=0.0,
                   help="in [-1, 1]: 0 = clear findings, towards 1 = faint findings, below 0 = "
                        "exaggerated findings (a teaching set)")
    p.add_argument("--force", action="store_true",
                   help="replace a synthetic release that synth wrote in OUT before")
    p.set_defaults(func=_synth)

    p = subcommand(sub, "prepare", "decode DICOMs and gaze once into the training cache")
    p.add_argument("--egd-root", type=Path, required=True,
                   help="folder with master_sheet.csv and fixations.csv")
    p.add_argument("--mimic-root", type=Path, required=True,
                   help="folder holding files/pXX/... (the MIMIC-CXR 2.0.0 root)")
    p.add_argument("--size", type=int, default=224, help="side of the square model input, px")
    p.add_argument("--subset", type=Path, default=None,
                   help="a filenames.csv naming the images to keep (Watanabe et al.'s 1,017; "
                        "default: every image of the master sheet)")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="the cache folder to write")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="an input that cannot be used: skip it and name it in the summary, or "
                        "exit non-zero")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: all cores)")
    p.add_argument("--sigma", type=float, default=150.0,
                   help="gaze blur in original pixels (the reference: 150 for ~3000 px images; "
                        "use about 20 for the default synthetic images of a few hundred px)")
    p.set_defaults(func=_prepare)

    p = subcommand(sub, "train", "train one configuration (no Ray), logged to MLflow",
                   epilog=_config_keys_help())
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="trial config keys (listed below); unset keys keep their defaults")
    p.add_argument("--experiment", default="train", help="MLflow experiment of the run")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow: http://HOST:PORT or sqlite:///PATH (default: ./mlflow.db)")
    p.set_defaults(func=_train)

    _add_service_commands(sub)
    return parser


def _config_keys_help() -> str:
    """The trial config keys as a table: key, default, accepted values, meaning."""
    from trainable.config import describe_keys

    rows = describe_keys()
    width = max(len(f"{k}={d}") for k, d, _, _ in rows) + 2
    lines = ["config keys (KEY=default: accepted values; meaning):"]
    for name, default, accepted, meaning in rows:
        lines.append(f"  {f'{name}={default}':<{width}}{accepted}; {meaning}")
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gazetune")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


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
