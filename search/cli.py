"""The `gazetune` command line (also `python -m search`): every subcommand's options.

Each subcommand parses its arguments here and calls one plain function; heavy imports (torch,
Ray, MLflow) happen inside the handlers so `gazetune --help` stays instant. The search's
defaults are `search.settings.SearchSettings`'s, the demo's `search.demo`'s.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path

from search import demo  # light: its heavy imports happen when the demo runs
from search.settings import DEFAULTS

# benchmarks/ is not an installed package: `gazetune bench` runs it from the source checkout.
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def _synth(args) -> int:
    from synthetic.release import synthesize

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
    from trainable.config import TrialConfig, parse_overrides
    from trainable.data.cache import data_origin
    from trainable.loop import check_inputs
    from trainable.pretrained import check_available, with_default_weights

    check_name(args.experiment, "--experiment")
    config = parse_overrides(args.overrides)
    cfg = TrialConfig.from_dict(config)
    check_inputs(cfg)  # before MLflow opens a run
    # imagenet for a cache of the real release
    config = with_default_weights(config, data_origin(cfg.cache), cfg.encoder)
    check_available(cfg.encoder, config.get("encoder_weights"))
    from search.tracking import train_logged

    train_logged(config, experiment=args.experiment, tracking_uri=args.tracking_uri)
    return 0


def _search(args) -> int:
    from search.service import run_search
    from search.settings import SearchSettings, parse_fixed

    settings = SearchSettings(
        name=time.strftime("search-%Y%m%d-%H%M%S") if args.name is None else args.name,
        space=args.space, samples=args.samples, max_epochs=args.max_epochs,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent, seed=args.seed, paper_points=args.paper_points,
        fixed=parse_fixed(args.fixed), max_failures=args.max_failures, address=args.address,
        storage=args.storage, cache=str(args.cache), tracking_uri=args.tracking_uri,
    )
    return _search_summary(run_search(settings))


def _resume(args) -> int:
    from search.service import resume_search

    return _search_summary(resume_search(args.name, storage=args.storage,
                                         tracking_uri=args.tracking_uri, address=args.address))


def _repeat(args) -> int:
    from search.repeat import repeat

    result = repeat(args.name, top=args.top, seeds=args.seeds, repeat_name=args.repeat_name,
                    max_epochs=args.max_epochs, cpus_per_trial=args.cpus_per_trial,
                    gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
                    max_failures=args.max_failures, address=args.address,
                    storage_path=args.storage, tracking_uri=args.tracking_uri,
                    reports=args.reports, n_boot=args.n_boot)
    return 130 if result is None else 0


def _search_summary(summary) -> int:
    print(f"search {summary.name!r}: {summary.completed} trials finished, {summary.pruned} "
          f"pruned, {summary.failed} failed (Tune state: {summary.path})")
    if summary.best:
        best, m = summary.best, summary.best["metrics"]
        # The score it was selected by first (val/gaze_auc/mean under selection=gaze_auc).
        scores = dict.fromkeys([best["metric"], "val/auc/mean"])
        print(f"best: trial {best['trial_id']} (MLflow run {best['run_id']}), epoch "
              f"{best['epoch']}: " + ", ".join(
                  f"{k} {m[k]:.3f} [{m[k + '/lo']:.3f}, {m[k + '/hi']:.3f}]" for k in scores))
    if summary.interrupted:
        print(f"interrupted: `gazetune resume {summary.name}` continues it")
        return 130
    return 0 if summary.completed + summary.pruned else 1


def _export(args) -> int:
    from search.export import export

    export(args.name, tracking_uri=args.tracking_uri, reports=args.reports, top_k=args.top_k,
           register=args.register)
    return 0


def _evaluate(args) -> int:
    if args.all_configurations:
        from search.configurations import evaluate_configurations

        evaluate_configurations(args.name, protocol=args.protocol, cache=args.cache,
                                tracking_uri=args.tracking_uri, reports=args.reports,
                                n_boot=args.n_boot)
        return 0
    from search.evaluate import evaluate_study

    evaluate_study(args.name, run_id=args.run_id, protocol=args.protocol, cache=args.cache,
                   tracking_uri=args.tracking_uri, reports=args.reports, n_boot=args.n_boot)
    return 0


def _predict(args) -> int:
    from search.predict import predict_files

    predict_files(args.model_uri, args.files, out=args.out, saliency=args.saliency,
                  tracking_uri=args.tracking_uri)
    return 0


def _demo(args) -> int:
    demo.run_demo(args.workdir, images=args.images, trials=args.trials, epochs=args.epochs,
                  seed=args.seed)
    return 0


def _bench(args) -> int:
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
    _add_tracking_uri(p)
    p.set_defaults(func=_train)

    _add_service_commands(sub)
    _add_report_commands(sub)
    _add_bench_command(sub)
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
    """search and resume: the service."""
    p = sub.add_parser("search", help="search with Ray Tune + Optuna + ASHA")
    p.add_argument("--name", default=None,
                   help="study name: Tune's folder and the MLflow experiment "
                        "(default: search-<date>-<time>)")
    p.add_argument("--cache", type=Path, default=Path(DEFAULTS.cache),
                   help="from `gazetune prepare`")
    p.add_argument("--space", default=DEFAULTS.space, help="search space: paper or extended")
    p.add_argument("--samples", type=int, default=DEFAULTS.samples, help="number of trials")
    p.add_argument("--max-epochs", type=int, default=DEFAULTS.max_epochs,
                   help="epochs of a trial ASHA keeps")
    p.add_argument("--grace-period", type=int, default=DEFAULTS.grace_period,
                   help="epochs before ASHA may stop a trial")
    p.add_argument("--reduction-factor", type=int, default=DEFAULTS.reduction_factor,
                   help="ASHA keeps the best 1/N of the trials at each rung")
    _add_trial_resources(p)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of Optuna's sampler")
    p.add_argument("--paper-points", action="store_true",
                   help="run the paper's eight configurations first, each to --max-epochs "
                        "(ASHA judges the trials after them)")
    p.add_argument("--set", dest="fixed", nargs="+", default=[], metavar="KEY=VALUE",
                   help="fixed trial settings, e.g. batch_size=16 n_boot=500")
    _add_location_options(p)
    p.set_defaults(func=_search)

    p = sub.add_parser("resume", help="continue an interrupted search")
    p.add_argument("name", help="the study name given to `gazetune search`")
    _add_location_options(p)
    p.set_defaults(func=_resume)

    p = sub.add_parser(
        "repeat", help="retrain a study's best trials with new seeds (as a search on the "
                       "cluster) and test them: mean ± sd and intervals over seeds and images",
        description="Retrain the --top best trials of study NAME (by validation AUC) with "
                    "--seeds seeds each that they did not use (seed + 1 ... + K), to the "
                    "study's budget, as the trials of a new study (NAME-repeat); then test "
                    "every model and write reports/NAME-repeat/repeat.{md,json}. Running the "
                    "same command again continues an interrupted repeat or, once it has "
                    "ended, only scores it again.")
    p.add_argument("name", help="the study whose trials to repeat (= its MLflow experiment)")
    p.add_argument("--top", type=int, default=2, help="how many of its best trials")
    p.add_argument("--seeds", type=int, default=3, help="new seeds per trial (at least 2)")
    p.add_argument("--name", dest="repeat_name", default=None, metavar="REPEAT",
                   help="the repeat's own study (default: NAME-repeat)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="epochs of each retraining (default: the study's --max-epochs)")
    _add_trial_resources(p)
    p.add_argument("--n-boot", type=int, default=0,
                   help="two-level bootstrap resamples of the test report (default: 2,000)")
    _add_location_options(p)
    p.add_argument("--reports", type=Path, default=Path("reports"),
                   help="folder of the reports (default: ./reports)")
    p.set_defaults(func=_repeat)


def _add_trial_resources(p: argparse.ArgumentParser) -> None:
    """What each trial of a search (or a repeat) gets from Ray, and its retries."""
    p.add_argument("--cpus-per-trial", type=float, default=DEFAULTS.cpus_per_trial,
                   help="CPU cores Ray reserves for each trial (also its torch threads)")
    p.add_argument("--gpus-per-trial", type=float, default=DEFAULTS.gpus_per_trial,
                   help="a GPU fraction per trial, e.g. 0.25 packs four trials on a GPU "
                        "(default: as many trials per GPU as fit at the cache's image size, "
                        "up to four; 0 without GPUs)")
    p.add_argument("--max-concurrent", type=int, default=DEFAULTS.max_concurrent,
                   help="trials at once (default: as many as the resources allow)")
    p.add_argument("--max-failures", type=int, default=DEFAULTS.max_failures,
                   help="retries of a failing trial from its last checkpoint")


def _add_tracking_uri(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow: http://HOST:PORT or sqlite:///PATH (default: ./mlflow.db)")


def _add_location_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULTS.address,
                   help="Ray cluster address (default: a new local Ray instance)")
    p.add_argument("--storage", default=DEFAULTS.storage,
                   help="Tune's storage: a path (shared on a cluster) or a URI such as s3://...")
    _add_tracking_uri(p)


def _add_report_commands(sub) -> None:
    """export, predict, evaluate and demo: reports of a study and its best model."""
    p = sub.add_parser("export", help="write reports/NAME/ from a study's MLflow runs")
    p.add_argument("name", help="the study name (= the MLflow experiment)")
    p.add_argument("--top-k", type=int, default=10,
                   help="trials listed in best_configs.json (default: 10)")
    p.add_argument("--register", default=None, metavar="MODEL",
                   help="also log the best trial's checkpoint as an MLflow Model of its run and "
                        "register it as a version of MODEL in the Model Registry (default: "
                        "no registration)")
    _add_report_options(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="class probabilities of new DICOMs from a logged model")
    p.add_argument("model_uri", metavar="MODEL_URI",
                   help="models:/NAME/VERSION (from export --register), runs:/RUN_ID/model, or "
                        "a downloaded model's folder")
    p.add_argument("files", nargs="+", metavar="FILE.dcm",
                   help="DICOMs, decoded and resized as `gazetune prepare` does")
    p.add_argument("--out", type=Path, default=None, metavar="CSV",
                   help="write the probabilities to this CSV (default: print a table)")
    p.add_argument("--saliency", type=Path, default=None, metavar="FOLDER",
                   help="write one saliency panel PNG per image into FOLDER (default: none)")
    _add_tracking_uri(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("evaluate",
                              help="evaluate a study's best checkpoint on the test split")
    p.add_argument("name", help="the study name (= the MLflow experiment)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run", dest="run_id", default=None,
                       help="a trial's MLflow run id (default: the best validation AUC)")
    which.add_argument("--all-configurations", action="store_true",
                       help="test the best trial of every loss set x generator instead: "
                            "configurations.{md,json} with per-class AUCs, paired bootstrap "
                            "differences against the classifier-only model, and a chart")
    p.add_argument("--protocol", choices=("stratified", "paper"), default="stratified",
                   help="bootstrap: stratified (2,000 resamples) or the paper's (30 of 55%%)")
    p.add_argument("--n-boot", type=int, default=0,
                   help="bootstrap resamples (default: the protocol's)")
    p.add_argument("--cache", type=Path, default=None,
                   help="prepared cache to test on (default: the one the trial trained on)")
    _add_report_options(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="synthetic data, a small search, its report and test "
                                           "evaluation (about 12 minutes on a 2-core CPU)")
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
    _add_tracking_uri(p)
    p.add_argument("--reports", type=Path, default=Path("reports"),
                   help="folder of the reports (default: ./reports)")


def _add_bench_command(sub) -> None:
    """bench: the performance ratios (benchmarks/bench.py), measured in one run."""
    p = sub.add_parser("bench", help="measure step-time ratios of the loss sets, data "
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
