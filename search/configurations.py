"""`gazetune evaluate NAME --all-configurations`: the test table of every configuration.

A configuration is a loss set with its generator (a loss set without a map counts once). The
best trial of each (at its best validation epoch, ranked as `gazetune evaluate` ranks them) is
scored on the test split through evaluate's own loading and scoring, so each row equals what
`gazetune evaluate NAME --run RUN_ID` reports for that trial. Beside the per-class AUCs, each
configuration's AUC minus the classifier-only model's on the same bootstrap resamples of the
same test images: at about 100 test images each AUC's interval is about ±0.08, so only the
paired difference can tell two configurations apart.

Writes `reports/NAME/configurations.{json,md}` and `figures/configurations.png`, and one MLflow
run of the study tagged `gazetune.kind` = `configurations`, which replaces the previous one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from search import tracking
from search.evaluate import (
    bootstrap_wording,
    check_n_boot,
    evaluate_checkpoint,
    load_trial,
    resamples,
)
from search.names import check_name
from search.reporting import (
    CONFIGURATIONS_JSON,
    CONFIGURATIONS_MD,
    CONFIGURATIONS_PNG,
    DATA_NOTES,
    FIGURES,
    claim_report_folder,
    format_auc,
    record_report,
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
from trainable.config import CLASS_NAMES
from trainable.data.cache import data_origin
from trainable.errors import GazetuneError
from trainable.generators import GENERATORS
from trainable.loss_sets import LOSS_SETS

REFERENCE = "classifier"  # the configuration every other is compared with
KIND = "configurations"  # the MLflow run's `gazetune.kind`


def evaluate_configurations(name: str, protocol: str = "stratified",
                            cache: str | Path | None = None, tracking_uri: str | None = None,
                            reports: str | Path = "reports", n_boot: int = 0,
                            workdir: Path | None = None) -> dict:
    """Score the best trial of every configuration of study `name` on the test split.

    Args: as `search.evaluate.evaluate_study` (without `run_id`).

    Returns:
        What `configurations.json` holds.
    """
    workdir = Path(workdir or Path.cwd())
    check_name(name)
    check_n_boot(n_boot)
    uri = tracking.resolve_tracking_uri(tracking_uri, workdir)
    best = best_of_each(ranked_trials(read_trials(uri, name)))
    if not best:
        raise GazetuneError(f"study {name!r}: no finished trial with a validation score "
                            f"to evaluate")
    # Every checkpoint first: a trial whose data differs stops the command before any scoring.
    loaded = [(trial, *load_trial(trial, uri, cache, protocol, n_boot, workdir))
              for trial in best]
    _check_one_cache([cfg for _, _, cfg in loaded])
    out = claim_report_folder(absolute(reports, workdir) / name)
    scored = []
    for trial, state, cfg in loaded:
        metrics, _, counts, predictions = evaluate_checkpoint(state, cfg, panels=False)
        scored.append((trial, cfg, metrics, predictions))
        print(f"{trial.label}: trial {trial.number}, test mean AUC "
              f"{format_auc(evaluation_scores(metrics)['mean'])}")
    result = _result(name, scored, counts, protocol)
    _chart(result, out / FIGURES / CONFIGURATIONS_PNG)
    _record(name, uri, best[0].parent, scored, out, result)
    print(f"test table of {len(scored)} configurations of study {name!r}: "
          f"{out / CONFIGURATIONS_MD}")
    return result


def best_of_each(ranked: list) -> list:
    """The first (best) trial of each configuration in `ranked`, in table order: the
    classifier first, then the loss sets and generators in the order the project lists them."""
    best = {}
    for trial in ranked:
        best.setdefault(trial.method, trial)
    sets, generators = list(LOSS_SETS), list(GENERATORS)
    return sorted(best.values(), key=lambda t: (
        t.method[0] != REFERENCE, sets.index(t.method[0]),
        generators.index(t.method[1]) if t.method[1] else -1))


def _check_one_cache(configs: list) -> None:
    """Paired differences need the same test images for every model."""
    caches = sorted({cfg.cache for cfg in configs})
    if len(caches) > 1:
        raise GazetuneError(f"the configurations' best trials trained on different caches "
                            f"({', '.join(caches)}): pass --cache to test them all on one")


def _result(name: str, scored: list, counts: dict, protocol: str) -> dict:
    """configurations.json: a row per configuration, differences against the classifier."""
    reference = next(((t, cfg, p) for t, cfg, _, p in scored if t.method[0] == REFERENCE), None)
    rows = []
    for trial, cfg, metrics, predictions in scored:
        rows.append({
            "configuration": trial.label, "loss_set": trial.method[0],
            "generator": trial.method[1], "run_id": trial.run_id, "trial": trial.number,
            "epoch": trial.epoch, "pruned": trial.pruned, "seed": cfg.seed,
            "checkpoint_uri": checkpoint_uri(trial.run_id),
            "val": trial.val, "test": evaluation_scores(metrics),
            "diff": None if reference is None else _paired(predictions, reference[2],
                                                           reference[1]),
        })
    cfg = scored[0][1]
    return {
        "study": name, "split": "test", "images": counts, "protocol": protocol,
        "n_boot": resamples(cfg), "alpha": 0.05, "data": data_origin(cfg.cache),
        "reference": None if reference is None else {
            "configuration": REFERENCE, "run_id": reference[0].run_id,
            "trial": reference[0].number, "seed": reference[1].seed},
        "configurations": rows, "figure": f"{FIGURES}/{CONFIGURATIONS_PNG}",
        "evaluation_run_id": None,
    }


def _paired(predictions: dict, reference: dict, cfg) -> dict:
    """{name: [AUC(model) - AUC(reference), lo, hi]} on the reference's resamples (its seed:
    the classifier's own row uses the same ones)."""
    from trainable.metrics import paired_bootstrap_diff

    if not np.array_equal(predictions["labels"], reference["labels"]):
        raise GazetuneError("the configurations were tested on different images: no paired "
                            "comparison is possible")
    diff = paired_bootstrap_diff(reference["labels"], predictions["probs"], reference["probs"],
                                 CLASS_NAMES, n_boot=resamples(cfg), seed=cfg.seed,
                                 protocol=cfg.boot_protocol)
    return {n: [finite(v) for v in diff[n]] for n in SCORES}


def _chart(result: dict, path: Path) -> None:
    from search.charts import configurations_chart
    from trainable.figures import save_figure

    rows = [{"label": row["configuration"], "auc": row["test"]["mean"][0],
             "lo": row["test"]["mean"][1], "hi": row["test"]["mean"][2]}
            for row in result["configurations"] if row["test"]["mean"][0] is not None]
    reference = next((row["test"]["mean"][0] for row in result["configurations"]
                      if row["loss_set"] == REFERENCE), None)
    save_figure(configurations_chart(rows, reference), path)


def _record(name: str, uri: str, parent: str | None, scored: list, out: Path,
            result: dict) -> None:
    """One MLflow run with every row's metrics and the report files; the runs of earlier
    `--all-configurations` of the study are deleted once it is FINISHED, so a rerun replaces
    them instead of adding a copy."""
    metrics = {}
    for row, (_, _, test_metrics, _) in zip(result["configurations"], scored):
        key = row["configuration"]
        metrics.update({f"{key}/{k}": v for k, v in test_metrics.items()
                        if k.startswith("test/auc/")})
        for score, values in (row["diff"] or {}).items():
            for bound, value in zip(("", "/lo", "/hi"), values):
                if value is not None:
                    metrics[f"{key}/diff/auc/{score}{bound}"] = value
    params = {"protocol": result["protocol"], "n_boot": result["n_boot"],
              "cache": scored[0][1].cache, "split": "test",
              "reference": (result["reference"] or {}).get("run_id", "none"),
              "configurations": len(scored)}
    record_report(uri, name, "test table of all configurations", KIND, parent, metrics, params,
                  out, result, (CONFIGURATIONS_JSON, CONFIGURATIONS_MD, CONFIGURATIONS_PNG),
                  configurations_markdown)


def _signed(value: list) -> str:
    diff, lo, hi = value
    if diff is None:
        return "–"
    interval = f" ({lo:+.3f} to {hi:+.3f})" if lo is not None and hi is not None else ""
    return f"{diff:+.3f}{interval}"


def configurations_markdown(result: dict) -> str:
    """configurations.md: the paper's table shape, plus the paired differences."""
    images, reference = result["images"], result["reference"]
    boot = bootstrap_wording(result["protocol"])
    if reference is None:
        against = ("**No classifier-only trial in this study: there is no reference to compare "
                   "with**, so the last column is empty.")
    else:
        against = (f"Last column: the configuration's mean AUC minus the classifier-only "
                   f"model's (trial {reference['trial']}), computed on the same "
                   f"{result['n_boot']} resamples of the same test images (seed "
                   f"{reference['seed']}); an interval that excludes 0 is a difference the "
                   f"test split can see, one that includes 0 is not.")
    lines = [
        f"# Test table of every configuration of study `{result['study']}`", "",
        DATA_NOTES[result.get("data", "unknown")], "",
        ("Each configuration (loss set × generator) is represented by its trial with the best "
         "validation AUC, at its best validation epoch; trials stopped early by the scheduler "
         "are marked. Recorded in MLflow as run "
         f"`{result['evaluation_run_id']}`."), "",
        f"Test split: {images['total']} images ("
        + ", ".join(f"{c} {images[c]}" for c in CLASS_NAMES) + f"). One-vs-rest AUC with 95% "
        f"percentile intervals, {boot}, {result['n_boot']} resamples, each trial's seed.", "",
        against, "",
        ("| configuration | trial | mean (95% CI) | Normal | CHF | pneumonia "
         "| mean − classifier (95% CI) |"),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["configurations"]:
        trial = f"{row['trial']} (epoch {row['epoch']}" + (", pruned)" if row["pruned"] else ")")
        if reference is None:
            diff = "no classifier trial"
        elif row["run_id"] == reference["run_id"]:
            diff = "reference"
        else:
            diff = _signed(row["diff"]["mean"])
        lines.append(f"| {row['configuration'].replace('/', ' ')} | {trial} | "
                     + " | ".join(format_auc(row["test"][n]) for n in SCORES) + f" | {diff} |")
    lines += ["", f"![test mean AUC per configuration]({result['figure']})", "",
              ("Points: each configuration's test mean AUC with its 95% interval; dashed line: "
               "the classifier-only model's. Per-class paired differences are in "
               f"`{CONFIGURATIONS_JSON}` (`diff`)."), ""]
    return "\n".join(lines)
