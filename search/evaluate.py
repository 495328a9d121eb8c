"""`gazetune evaluate NAME`: a trial's best checkpoint on the held-out test split.

The only place the test split is read. The checkpoint and its config come back from MLflow
(through `search.tracking`, so a tracking server works as well as a local store),
the model is rebuilt from that config and evaluated on the test split of the cache the trial
used, with the same bootstrap AUCs and map agreement as validation. The result goes to
`reports/NAME/evaluation.{json,md}` and test-split heatmap panels, into the `test` of the
trial's entry in `best_configs.json`, and into an MLflow run of the study tagged
`evaluates` = the trial's run id and `gazetune.kind` = `evaluation`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from search import tracking
from search.names import check_name
from search.reporting import (
    BEST_CONFIGS,
    DATA_NOTES,
    FIGURES,
    PAPER,
    PAPER_SOURCE,
    claim_report_folder,
    format_auc,
    write_json,
    write_text,
)
from search.storage import absolute
from search.study import (
    SCORES,
    checkpoint_uri,
    evaluation_scores,
    finite,
    ranked_trials,
    read_trials,
)
from trainable.config import CLASS_NAMES, TrialConfig
from trainable.data.cache import data_origin
from trainable.errors import GazetuneError

EVALUATION_JSON, EVALUATION_MD = "evaluation.json", "evaluation.md"
PANELS = "test_heatmaps.png"
PANELS_PER_CLASS = 3


def evaluate_study(name: str, run_id: str | None = None, protocol: str = "stratified",
                   cache: str | Path | None = None, tracking_uri: str | None = None,
                   reports: str | Path = "reports", n_boot: int = 0,
                   workdir: Path | None = None) -> dict:
    """Evaluate the best trial of study `name` (or run `run_id`) on the test split.

    Args:
        name: the study (= the MLflow experiment's name).
        run_id: a trial's MLflow run; None for the trial with the best validation AUC.
        protocol: the bootstrap, "stratified" or "paper" (`trainable.metrics`).
        cache: the prepared cache to read the test split from; None for the one the trial
            trained on (its config's `cache`).
        tracking_uri: http(s)://HOST:PORT or sqlite:///PATH; None for `<workdir>/mlflow.db`.
        reports: the folder of report folders (relative to `workdir`).
        n_boot: bootstrap resamples; 0 for the protocol's default (2,000; paper: 30).
        workdir: where relative paths are taken from (default: the current directory).

    Returns:
        What `evaluation.json` holds.
    """
    workdir = Path(workdir or Path.cwd())
    check_name(name)
    check_n_boot(n_boot)
    uri = tracking.resolve_tracking_uri(tracking_uri, workdir)
    trials = read_trials(uri, name)
    ranked = ranked_trials(trials)
    trial = _pick_trial(trials, ranked, name, run_id)
    # Another trial's evaluation goes beside the best trial's, never over it.
    files = report_files(None if ranked and ranked[0].run_id == trial.run_id else trial.number)
    state, cfg = load_trial(trial, uri, cache, protocol, n_boot, workdir)
    out = claim_report_folder(absolute(reports, workdir) / name)
    metrics, figure, counts, _ = evaluate_checkpoint(state, cfg)

    result = {
        "study": name, "run_id": trial.run_id, "trial": trial.number,
        "method": trial.label, "epoch": trial.epoch,
        "checkpoint_uri": checkpoint_uri(trial.run_id), "split": "test",
        "images": counts, "protocol": protocol, "n_boot": resamples(cfg), "alpha": 0.05,
        "seed": cfg.seed, "test": evaluation_scores(metrics), "val": trial.val,
        "agreement": _agreement(metrics), "evaluation_run_id": None,
        "data": data_origin(cfg.cache), "panels": f"{FIGURES}/{files[2]}",
    }
    from trainable.figures import save_figure

    save_figure(figure, out / FIGURES / files[2])
    result["evaluation_run_id"] = _record(name, uri, trial, cfg, metrics, out, result, files)
    _fill_best_configs(out / BEST_CONFIGS, trial.run_id, result["test"])
    print(f"test split of study {name!r}, trial {trial.number} (run {trial.run_id}): mean AUC "
          f"{format_auc(result['test']['mean'])}; report: {out / files[1]}")
    return result


def check_n_boot(n_boot: int) -> None:
    if not 0 <= n_boot <= 1_000_000:
        raise GazetuneError(f"--n-boot must be in [0, 1000000] (0: the protocol's default), "
                            f"got {n_boot}")


def load_trial(trial, uri: str, cache: str | Path | None, protocol: str, n_boot: int,
               workdir: Path) -> tuple[dict, TrialConfig]:
    """(model state dict, config to test it with) of a trial's best checkpoint: its own config
    with the bootstrap asked for, on `cache` (checked to be the data it trained on) or its own.
    """
    with tempfile.TemporaryDirectory(prefix="gazetune-evaluate-") as scratch:
        state, config, best = pull_checkpoint(trial.run_id, uri, Path(scratch))
    if cache:
        cache = str(absolute(cache, workdir))
        _check_same_cache(cache, best.get("cache_input_hash"), trial.number)
    else:
        cache = config["cache"]
    return state, TrialConfig.from_dict({**config, "cache": cache, "boot_protocol": protocol,
                                         "n_boot": n_boot, "checkpoint_dir": None,
                                         # the trial's share of a packed GPU; evaluation runs
                                         # alone
                                         "gpu_memory_fraction": 0.0})


def report_files(trial: int | None) -> tuple[str, str, str]:
    """(json, markdown, panels) file names: the best trial's, or those of trial number `trial`
    evaluated with `--run`, which sit beside them."""
    if trial is None:
        return EVALUATION_JSON, EVALUATION_MD, PANELS
    return (f"evaluation-trial-{trial}.json", f"evaluation-trial-{trial}.md",
            f"test_heatmaps_trial-{trial}.png")


def pull_checkpoint(run_id: str, tracking_uri: str, scratch: Path) -> tuple[dict, dict, dict]:
    """(model state dict, trial config, metrics) of a run's `checkpoint/` artifact (its best
    epoch)."""
    from trainable.checkpoint import load_best

    try:
        local = tracking.download_artifact(tracking_uri, run_id, "checkpoint", scratch)
    except GazetuneError as err:
        raise GazetuneError(f"{err}: nothing to evaluate") from None
    # The artifact holds a checkpoint folder's best/ files: model.pt, config.json, metrics.json.
    return load_best(Path(local))


def _check_same_cache(cache: str, trained_on: str | None, number: int) -> None:
    """Refuse a `--cache` other than the one the trial trained on (its input hash: the same
    images, labels, split and preprocessing); a test split of other data would be written into
    the study's report as its test result."""
    from trainable.data.cache import input_hash

    if not Path(cache).is_dir():
        return  # said with what to do when the cache is read
    if trained_on is None:  # a checkpoint from before the hash was recorded
        print(f"note: trial {number}'s checkpoint does not record its cache; {cache} is taken "
              f"as the cache it trained on")
        return
    found = input_hash(cache)
    if found != trained_on:
        raise GazetuneError(f"--cache {cache}: not the cache trial {number} trained on (another "
                            f"release, subset or preprocessing: input hash {str(found)[:12]}, "
                            f"the trial's {trained_on[:12]}); evaluate on the study's own cache")


def _pick_trial(trials: list, ranked: list, name: str, run_id: str | None):
    """Run `run_id` among `trials`, or the best of `ranked` when it is None."""
    if run_id is None:
        if not ranked:
            raise GazetuneError(f"study {name!r}: no finished trial with a validation score "
                                f"to evaluate")
        return ranked[0]
    for trial in trials:
        if trial.run_id == run_id:
            return trial
    raise GazetuneError(f"run {run_id} is not a trial of study {name!r}")


def evaluate_checkpoint(state: dict, cfg: TrialConfig, panels: bool = True):
    """(test-split metrics, heatmap panels or None, image counts, predictions) of the
    checkpoint's model; predictions as `trainable.loop.evaluate` returns them."""
    from trainable.data import load_cache
    from trainable.loop import DeviceData, choose_device, evaluate
    from trainable.model import build_model

    if not Path(cfg.cache).is_dir():
        raise GazetuneError(f"cache {cfg.cache} (the trial's) does not exist here: pass --cache "
                            f"with the prepared cache of the same data")
    device = choose_device(cfg)
    data = DeviceData(load_cache(cfg.cache), device)
    model = build_model(cfg, load_encoder_weights=False)  # the checkpoint holds them
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise GazetuneError(f"checkpoint does not fit the model of its config: {err}") from None
    model.to(device)
    idx = data.indices("test")
    if len(idx) == 0:
        raise GazetuneError(f"cache {cfg.cache} has no test split")
    metrics, predictions = evaluate(model, data, idx, cfg, prefix="test")
    labels = data.cache.labels[idx]
    counts = {"total": len(idx),
              **{c: int(n) for c, n in zip(CLASS_NAMES, labels.sum(0))}}
    figure = _panels(data, idx, predictions, cfg) if panels else None
    return metrics, figure, counts, predictions


def _panels(data, idx: np.ndarray, predictions: dict, cfg: TrialConfig):
    """input | generator map | gaze | mask for up to 3 test images per class, correctly
    classified ones first; rows are titled by class and probability only."""
    from trainable.figures import heatmap_panels

    probs, y = predictions["probs"], predictions["labels"].argmax(1)
    chosen = []
    for c in range(len(CLASS_NAMES)):
        of_class = np.flatnonzero(y == c)
        right = of_class[probs[of_class].argmax(1) == c]
        wrong = of_class[probs[of_class].argmax(1) != c]
        chosen.extend(np.concatenate([right, wrong])[:PANELS_PER_CLASS].tolist())
    sel = idx[chosen]
    titles = [f"{CLASS_NAMES[y[i]]} (p={probs[i, y[i]]:.2f})"
              + ("" if probs[i].argmax() == y[i] else ", missed") for i in chosen]
    masks = predictions["masks"]
    return heatmap_panels(data.cache.images[sel].astype(np.float32), predictions["maps"][chosen],
                          data.cache.heatmaps[sel].astype(np.float32),
                          None if masks is None else masks[chosen], titles=titles)


def _row(label: str, scores: dict) -> str:
    return f"| {label} | " + " | ".join(format_auc(scores[n]) for n in SCORES) + " |"


def _agreement(metrics: dict) -> dict:
    """{"map": {cc, kl, nss}, "mask": {...}} (mask only for models with a decoder)."""
    out: dict = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[1] in ("map", "mask"):
            out.setdefault(parts[1], {})[parts[2]] = finite(value)
    return out


def bootstrap_wording(protocol: str) -> str:
    """How a test report names its bootstrap protocol."""
    return ("stratified bootstrap" if protocol == "stratified"
            else "the paper's bootstrap (resamples of 55% of the images, their median as the AUC)")


def resamples(cfg: TrialConfig) -> int:
    from trainable.metrics import DEFAULT_N_BOOT

    return cfg.n_boot or DEFAULT_N_BOOT[cfg.boot_protocol]


def _record(name: str, uri: str, trial, cfg: TrialConfig, metrics: dict, out: Path,
            result: dict, files: tuple[str, str, str]) -> str:
    """The study's evaluation run in MLflow, with the report files as its artifacts."""
    with tracking.evaluation_run(uri, name, run_name=f"evaluation of trial {trial.number}",
                                 tags={"evaluates": trial.run_id,
                                       "gazetune.kind": "evaluation",
                                       # shown under the search, beside its trials
                                       **({tracking.PARENT_TAG: trial.parent}
                                          if trial.parent else {})}) as run:
        run.log(metrics, {"protocol": cfg.boot_protocol, "n_boot": result["n_boot"],
                          "cache": cfg.cache, "evaluated_run": trial.run_id, "split": "test"})
        result["evaluation_run_id"] = run.run_id
        write_json(out / files[0], result)
        write_text(out / files[1], evaluation_markdown(result))
        run.log_artifact(out / files[0])
        run.log_artifact(out / files[1])
        run.log_artifact(out / FIGURES / files[2], "figures")
    return run.run_id


def _fill_best_configs(path: Path, run_id: str, test: dict) -> None:
    """Put the test AUCs into the run's entry of best_configs.json (when it is listed)."""
    import json

    if not path.is_file():
        print(f"no {path}: `gazetune export` writes it (the test AUCs are in "
              f"{EVALUATION_JSON})")
        return
    items = json.loads(path.read_text())
    listed = [item for item in items if item["run_id"] == run_id]
    for item in listed:
        item["test"] = test
    if listed:
        write_json(path, items)
    else:
        print(f"run {run_id} is not among the configurations in {path}; its test AUCs are in "
              f"{EVALUATION_JSON}")


def evaluation_markdown(result: dict) -> str:
    """evaluation.md: test AUCs beside the validation ones and the paper's, map agreement."""
    images = result["images"]
    method = tuple(result["method"].split("/")) + ((None,) if "/" not in result["method"] else ())
    boot = bootstrap_wording(result["protocol"])
    lines = [
        f"# Test evaluation of study `{result['study']}`",
        "",
        DATA_NOTES[result.get("data", "unknown")],
        "",
        (f"Trial {result['trial']} ({result['method']}), MLflow run `{result['run_id']}`, its "
        f"best validation epoch ({result['epoch']}), checkpoint `{result['checkpoint_uri']}`. "
        f"Recorded in MLflow as run `{result['evaluation_run_id']}`."),
        "",
        f"Test split: {images['total']} images ("
        + ", ".join(f"{c} {images[c]}" for c in CLASS_NAMES) + f"). One-vs-rest AUC with 95% "
        f"percentile intervals, {boot}, {result['n_boot']} resamples, seed {result['seed']}.",
        "",
        "| | mean (95% CI) | Normal | CHF | pneumonia |",
        "| --- | --- | --- | --- | --- |",
        _row("test", result["test"]),
    ]
    if result.get("val"):
        lines.append(_row("validation", result["val"]))
    if method in PAPER:
        label, mean, per_class = PAPER[method]
        lines.append(f"| {PAPER_SOURCE} ({label}) | " + " | ".join(
            [format_auc(list(mean)), *(f"{auc:.3f}" for auc in per_class)]) + " |")
    lines += ["", "## Agreement of maps with the radiologist's gaze", "",
              ("Mean over test images: Pearson CC (higher is closer), KL divergence of the map "
              "from the gaze heatmap (lower is closer), NSS at the fixations (higher is closer)."),
              "", "| map | CC | KL | NSS |", "| --- | --- | --- | --- |"]
    names = {"map": "generator map", "mask": "decoder mask"}
    for kind, values in result["agreement"].items():
        lines.append(f"| {names[kind]} | " + " | ".join(
            "–" if values.get(k) is None else f"{values[k]:.3f}" for k in ("cc", "kl", "nss"))
            + " |")
    panels = result.get("panels", f"{FIGURES}/{PANELS}")
    lines += ["", f"![test heatmap panels]({panels})", "",
              ("Rows: test images by class (correctly classified first), titled by class and "
              "predicted probability; columns: input, generator map, gaze map, decoder mask."), ""]
    return "\n".join(lines)


