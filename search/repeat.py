"""`gazetune repeat NAME --top N --seeds K`: retrain a study's best trials with new seeds.

A search ranks trials that each trained once: the winner is partly the configuration and partly
the seed it drew (and the validation images it was picked on), and at the synthetic demo's size
the spread over seeds is as large as the differences between loss sets. Here the N best trials
(ranked by validation AUC, as `gazetune export` ranks them) are trained again, each with K
seeds it has not used (its own seed + 1 ... + K), to the study's full budget and selected at
their best validation epoch as the search selects. The retraining is itself a search: the
study `NAME-repeat` (or `--name`), its trials run on the Ray cluster like any search's, each
with its own MLflow run, and `gazetune resume` or running the same `repeat` again continues it.

Every retrained model is then scored on the test split (through `gazetune evaluate`'s loading
and scoring), and each configuration reported as mean ± sd over its seeds with an interval
over seeds and images (`trainable.metrics.seeds_bootstrap_auc`), and its difference from the
first (best) configuration on the same images.

Writes `reports/<repeat study>/repeat.{json,md}` and `figures/repeat.png`, and one MLflow run of
the repeat study tagged `gazetune.kind` = `repeat`, which replaces the previous one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from search import storage, tracking
from search.evaluate import check_n_boot, evaluate_checkpoint, load_trial
from search.names import check_name
from search.reporting import (
    DATA_NOTES,
    FIGURES,
    REPEAT_JSON,
    REPEAT_MD,
    REPEAT_PNG,
    claim_report_folder,
    format_auc,
    record_report,
)
from search.settings import (
    DEFAULTS,
    SETTINGS_FILE,
    SearchSettings,
    check_option,
    load_settings,
)
from search.storage import absolute
from search.study import SCORES, evaluation_scores, finite, ranked_trials, read_trials, space_name
from trainable.config import CLASS_NAMES, ConfigError, TrialConfig
from trainable.data.cache import data_origin
from trainable.errors import GazetuneError
from trainable.metrics import DEFAULT_N_BOOT, seeds_bootstrap_auc

KIND = "repeat"  # the MLflow run's `gazetune.kind`
# Set by the repeat itself (the seed) or by the cluster it runs on, not copied from the trial.
RUNTIME_KEYS = ("cache", "epochs", "threads", "gpu_memory_fraction", "checkpoint_dir", "seed")
RANGES = {"top": (1, 100), "seeds": (2, 100)}  # sd and intervals over seeds need two


def repeat(name: str, top: int = 2, seeds: int = 3, repeat_name: str | None = None,
           max_epochs: int | None = None, cpus_per_trial: float = DEFAULTS.cpus_per_trial,
           gpus_per_trial: float | None = DEFAULTS.gpus_per_trial,
           max_concurrent: int | None = DEFAULTS.max_concurrent,
           max_failures: int = DEFAULTS.max_failures, address: str | None = DEFAULTS.address,
           storage_path: str = DEFAULTS.storage, tracking_uri: str | None = None,
           reports: str | Path = "reports", n_boot: int = 0, workdir: Path | None = None,
           trainable: Callable | None = None) -> dict | None:
    """Retrain the `top` best trials of study `name` with `seeds` new seeds each, and report.

    Args:
        name: the study whose trials to repeat.
        top, seeds: how many of its best trials, with how many seeds each.
        repeat_name: the repeat's own study (default: `<name>-repeat`).
        max_epochs: epochs of each retraining (default: the study's budget).
        cpus_per_trial, gpus_per_trial, max_concurrent, max_failures, address, storage_path,
            tracking_uri: as for `gazetune search`.
        reports, n_boot: the report's folder and bootstrap resamples (0: 2,000).
        workdir: where relative paths and the embedded MLflow store live (default: cwd).
        trainable: as for `search.service.run_search` (tests inject faults).

    Returns:
        What `repeat.json` holds; None when the retraining was interrupted (running the same
        command again continues it).
    """
    from search.service import resume_search, run_search

    workdir = Path(workdir or Path.cwd())
    check_name(name)
    given = bool(repeat_name)
    repeat_name = repeat_name if given else f"{name}-repeat"
    check_name(repeat_name, "--name" if given else "the repeat's study (default NAME-repeat; --name)")
    for option, value in (("top", top), ("seeds", seeds)):
        low, high = RANGES[option]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"--{option} must be an integer in [{low}, {high}], got {value!r}")
    for option, value in (("max_epochs", 1 if max_epochs is None else max_epochs),
                          ("cpus_per_trial", cpus_per_trial), ("gpus_per_trial", gpus_per_trial),
                          ("max_concurrent", max_concurrent), ("max_failures", max_failures)):
        check_option(option, value)  # before the study is read
    check_n_boot(n_boot)
    uri = tracking.resolve_tracking_uri(tracking_uri, workdir)
    trials = read_trials(uri, name)
    chosen = _top(ranked_trials(trials), top, name)
    points, repeat_of, cache, epochs = _plan(name, chosen, seeds, max_epochs)
    settings = SearchSettings(
        name=repeat_name, space=space_name(uri, trials), samples=len(points),
        max_epochs=epochs, grace_period=min(DEFAULTS.grace_period, epochs),
        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
        max_concurrent=max_concurrent, max_failures=max_failures, points=points,
        repeat_of=repeat_of, address=address, storage=storage_path, cache=cache,
        tracking_uri=uri)
    saved = _saved(settings, workdir)
    if saved is None:
        summary = run_search(settings, trainable=trainable, workdir=workdir)
    elif _ended(uri, saved) < saved.samples:
        summary = resume_search(repeat_name, storage=storage_path, tracking_uri=uri,
                                address=address, trainable=trainable, workdir=workdir)
    else:
        print(f"repeat {repeat_name!r}: its {saved.samples} trials have ended; scoring them")
        summary = None
    if summary is not None and summary.interrupted:
        print(f"repeat {repeat_name!r} interrupted: the same `gazetune repeat` command (or "
              f"`gazetune resume {repeat_name}`) continues it")
        return None
    return score_repeat(repeat_name, uri, reports=reports, n_boot=n_boot, workdir=workdir,
                        storage_path=storage_path)


def _top(ranked: list, top: int, name: str) -> list:
    if len(ranked) < top:
        raise GazetuneError(f"study {name!r} has {len(ranked)} finished trial(s) with a "
                            f"validation score: --top {top} asks for more")
    return ranked[:top]


def _plan(name: str, chosen: list, seeds: int,
          max_epochs: int | None) -> tuple[list, dict, str, int]:
    """(the retrainings' configs, trial-major; what they repeat; the cache; the epochs)."""
    configs = [trial.config() for trial in chosen]
    caches = sorted({c["cache"] for c in configs})
    if len(caches) > 1:
        raise GazetuneError(f"the chosen trials trained on different caches ({', '.join(caches)})"
                            f": a repeat compares them on one")
    budgets = sorted({c["epochs"] for c in configs})
    if max_epochs is None and len(budgets) > 1:
        raise GazetuneError(f"the chosen trials had different budgets ({budgets} epochs): "
                            f"pass --max-epochs")
    epochs = budgets[0] if max_epochs is None else max_epochs
    # Each retraining's config as a search gives it: the keys where some chosen trial differs
    # from the defaults (the trainable fills in the rest, as it did for the trials), the loss
    # set always, and a new seed. One set of keys for all: Tune takes the points as values of
    # one space.
    defaults = {f.name: f.default for f in dataclasses.fields(TrialConfig)}
    keys = [k for k in defaults if k not in RUNTIME_KEYS
            and (k == "loss_set" or any(c[k] != defaults[k] for c in configs))]
    points = [{**{k: c[k] for k in keys}, "seed": c["seed"] + s}
              for c in configs for s in range(1, seeds + 1)]
    repeat_of = {"study": name, "seeds": seeds, "epochs": epochs,
                 "trials": [{"number": t.number, "run_id": t.run_id, "label": t.label,
                             "seed": c["seed"], "val": t.score}
                            for t, c in zip(chosen, configs)]}
    return points, repeat_of, caches[0], epochs


def _saved(settings: SearchSettings, workdir: Path) -> SearchSettings | None:
    """The repeat study already started under this name (None: none), refused unless it
    repeats the same trials with the same seeds and epochs."""
    located = storage.located(settings.storage, workdir)
    if not storage.exists(f"{located.rstrip('/')}/{settings.name}/{SETTINGS_FILE}"):
        return None
    saved = load_settings(settings.name, settings.storage, workdir)
    if saved.repeat_of is None:
        raise GazetuneError(f"{settings.name!r} is a search, not a repeat: pass --name")
    if _normal(saved.repeat_of) != _normal(settings.repeat_of):
        was, now = saved.repeat_of, settings.repeat_of
        raise GazetuneError(
            f"repeat {settings.name!r} retrained trials {_numbers(was)} of study "
            f"{was['study']!r} with {was['seeds']} seeds for {was['epochs']} epochs; this "
            f"asks for trials {_numbers(now)} of {now['study']!r} with {now['seeds']} seeds "
            f"for {now['epochs']} epochs: pass --name for a new repeat")
    return saved


def _normal(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _numbers(repeat_of: dict) -> str:
    return ", ".join(str(t["number"]) for t in repeat_of["trials"])


def _ended(uri: str, saved: SearchSettings) -> int:
    """Trials of the repeat whose run has ended (finished or failed for good)."""
    try:
        runs = read_trials(uri, saved.name)
    except GazetuneError:  # the experiment was never created: nothing ran
        return 0
    return sum(t.status in ("FINISHED", "FAILED") and t.parent == saved.parent_run_id
               for t in runs)


def score_repeat(repeat_name: str, uri: str, reports: str | Path = "reports", n_boot: int = 0,
                 workdir: Path | None = None, storage_path: str = DEFAULTS.storage) -> dict:
    """Test every retrained model of repeat study `repeat_name` and write the report."""
    workdir = Path(workdir or Path.cwd())
    settings = load_settings(repeat_name, storage_path, workdir)
    of, k = settings.repeat_of, settings.repeat_of["seeds"]
    runs = {t.number: t for t in read_trials(uri, repeat_name)
            if t.parent == settings.parent_run_id}
    out = claim_report_folder(absolute(reports, workdir) / repeat_name)
    groups, counts, labels = [], None, None
    for c, source in enumerate(of["trials"]):
        seeds = []
        for number in range(c * k, (c + 1) * k):
            trial = runs.get(number)
            if trial is None or trial.status != "FINISHED" or trial.epoch is None:
                status = "missing" if trial is None else trial.status.lower()
                print(f"trial {number} of {repeat_name!r} ({status}) has no model to test")
                continue
            state, cfg = load_trial(trial, uri, None, "stratified", n_boot, workdir)
            metrics, _, counts, predictions = evaluate_checkpoint(state, cfg, panels=False)
            if labels is not None and not np.array_equal(labels, predictions["labels"]):
                raise GazetuneError(f"trial {number} of {repeat_name!r} was tested on other "
                                    f"images than the trials before it")
            labels = predictions["labels"]
            seeds.append({"seed": cfg.seed, "trial": number, "run_id": trial.run_id,
                          "epoch": trial.epoch, "val": trial.score,
                          "test": evaluation_scores(metrics), "probs": predictions["probs"]})
            print(f"{source['label']} (trial {source['number']}) seed {cfg.seed}: test mean "
                  f"AUC {format_auc(evaluation_scores(metrics)['mean'])}")
        groups.append((source, seeds))
    if labels is None:
        raise GazetuneError(f"repeat {repeat_name!r}: no retrained model finished")
    result = _result(repeat_name, settings, groups, labels, counts, n_boot or
                     DEFAULT_N_BOOT["stratified"], uri)
    _chart(result, out / FIGURES / REPEAT_PNG)
    _record(repeat_name, uri, settings.parent_run_id, out, result)
    print(f"repeat of {len(groups)} trials of study {of['study']!r} over {k} seeds: "
          f"{out / REPEAT_MD}")
    return result


def _result(repeat_name: str, settings: SearchSettings, groups: list, labels, counts: dict,
            n_boot: int, uri: str) -> dict:
    """repeat.json: a row per repeated trial, with each seed's model and the summaries."""
    of = settings.repeat_of
    first = next((np.stack([s["probs"] for s in seeds]) for _, seeds in groups if seeds), None)
    rows = []
    for source, seeds in groups:
        row = {"configuration": f"trial {source['number']}: {source['label']}", **{
            key: source[key] for key in ("number", "run_id", "label")},
            "source_seed": source["seed"], "selected_val": source["val"],
            "seeds": [{k: v for k, v in s.items() if k != "probs"} for s in seeds],
            "test": None, "sd": None, "val": None, "diff": None}
        if seeds:
            probs = np.stack([s["probs"] for s in seeds])
            row["test"] = _intervals(seeds_bootstrap_auc(labels, probs, CLASS_NAMES, n_boot))
            row["sd"] = {n: _sd([s["test"][n][0] for s in seeds]) for n in SCORES}
            vals = [s["val"] for s in seeds if s["val"] is not None]
            row["val"] = [finite(np.mean(vals)) if vals else None, _sd(vals)]
            if rows and first is not None:
                row["diff"] = _intervals(seeds_bootstrap_auc(labels, probs, CLASS_NAMES,
                                                             n_boot, reference=first))
        rows.append(row)
    return {"study": of["study"], "repeat": repeat_name, "split": "test", "images": counts,
            "seeds": of["seeds"], "epochs": of["epochs"], "n_boot": n_boot, "alpha": 0.05,
            "data": data_origin(settings.cache), "configurations": rows,
            "figure": f"{FIGURES}/{REPEAT_PNG}", "evaluation_run_id": None}


def _intervals(values: dict) -> dict:
    return {n: [finite(v) for v in values[n]] for n in SCORES}


def _sd(values: list) -> float | None:
    """Sample standard deviation (n - 1); None below two values."""
    values = [v for v in values if v is not None]
    return finite(np.std(values, ddof=1)) if len(values) > 1 else None


def _chart(result: dict, path: Path) -> None:
    from search.charts import repeat_chart
    from trainable.figures import save_figure

    rows = [{"label": row["configuration"], "auc": row["test"]["mean"][0],
             "lo": row["test"]["mean"][1], "hi": row["test"]["mean"][2],
             "seeds": [s["test"]["mean"][0] for s in row["seeds"]]}
            for row in result["configurations"] if row["test"] and row["test"]["mean"][0]]
    save_figure(repeat_chart(rows), path)


def _record(repeat_name: str, uri: str, parent: str | None, out: Path, result: dict) -> None:
    """One MLflow run of the repeat study with each configuration's summaries and the report
    files; a rerun's run replaces the earlier one once it is FINISHED."""
    metrics, params = {}, {"n_boot": result["n_boot"], "seeds": result["seeds"],
                           "epochs": result["epochs"], "study": result["study"]}
    for row in result["configurations"]:
        key = f"trial{row['number']}"
        params[key] = row["label"]
        for name in SCORES if row["test"] else ():
            for bound, value in zip(("", "/lo", "/hi"), row["test"][name]):
                if value is not None:
                    metrics[f"{key}/test/auc/{name}{bound}"] = value
            if row["sd"][name] is not None:
                metrics[f"{key}/test/auc/{name}/sd"] = row["sd"][name]
            for bound, value in zip(("", "/lo", "/hi"), (row["diff"] or {}).get(name, ())):
                if value is not None:
                    metrics[f"{key}/diff/auc/{name}{bound}"] = value
    record_report(uri, repeat_name, "test of the repeated trials", KIND, parent, metrics, params,
                  out, result, (REPEAT_JSON, REPEAT_MD, REPEAT_PNG), repeat_markdown)


def _mean_sd(mean, sd) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f}"


def _signed(value: list | None) -> str:
    if not value or value[0] is None:
        return "–"
    diff, lo, hi = value
    return f"{diff:+.3f}" + (f" ({lo:+.3f} to {hi:+.3f})" if lo is not None else "")


def repeat_markdown(result: dict) -> str:
    """repeat.md: each repeated trial's seeds, mean ± sd and intervals over seeds and images."""
    images, rows = result["images"], result["configurations"]
    lines = [
        f"# Repeat of the best trials of study `{result['study']}` over {result['seeds']} seeds",
        "", DATA_NOTES[result.get("data", "unknown")], "",
        (f"Each trial below was trained again with {result['seeds']} seeds it had not used "
         f"(its own seed + 1 ... + {result['seeds']}) for {result['epochs']} epochs, each "
         f"model taken at its best validation epoch as the search takes it, then tested. The "
         f"retrainings are the study `{result['repeat']}` (one MLflow run per seed); this "
         f"report is its run `{result['evaluation_run_id']}`."), "",
        (f"Test split: {images['total']} images ("
         + ", ".join(f"{c} {images[c]}" for c in CLASS_NAMES) + "). Test mean AUC: the mean "
         f"over seeds ± their standard deviation, and a 95% interval from {result['n_boot']:,} "
         "two-level bootstrap resamples (images stratified by class, then seeds with "
         "replacement), which counts both the test images' and the seeds' variation. Last "
         "column: the difference from the first row on the same image resamples; an interval "
         "that excludes 0 is a difference that seeds and test images together can see."), "",
        ("The validation AUC the search selected each trial by is beside its repeats' mean: "
         "the selected run's is usually higher, as a winner is picked partly for its luck."),
        "",
        ("| configuration | selected at val | repeats' val | test mean AUC ± sd (95% CI) "
         "| per seed | minus first (95% CI) |"),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, row in enumerate(rows):
        test = row["test"]
        auc = "no finished retraining" if test is None else (
            f"{_mean_sd(test['mean'][0], row['sd']['mean'])} ({test['mean'][1]:.3f}–"
            f"{test['mean'][2]:.3f})")
        per_seed = ", ".join(f"{s['test']['mean'][0]:.3f}" for s in row["seeds"]
                             if s["test"]["mean"][0] is not None) or "–"
        diff = "reference" if i == 0 else _signed((row["diff"] or {}).get("mean"))
        selected = "–" if row["selected_val"] is None else f"{row['selected_val']:.3f}"
        val = _mean_sd(*row["val"]) if row["val"] else "–"
        lines.append(f"| {row['configuration'].replace('/', ' ')} | {selected} | {val} | {auc} "
                     f"| {per_seed} | {diff} |")
    lines += ["", "Per class (mean over seeds ± sd):", "",
              "| configuration | " + " | ".join(CLASS_NAMES) + " |",
              "| --- | " + " | ".join("---" for _ in CLASS_NAMES) + " |"]
    for row in rows:
        cells = [_mean_sd(row["test"][n][0], row["sd"][n]) if row["test"] else "–"
                 for n in CLASS_NAMES]
        lines.append(f"| {row['configuration'].replace('/', ' ')} | " + " | ".join(cells) + " |")
    lines += ["", f"![test mean AUC per seed and over seeds]({result['figure']})", "",
              ("Dots: each seed's model; bar: the mean over seeds with its 95% interval over "
               f"seeds and images. Per-class intervals and differences are in `{REPEAT_JSON}`."),
              ""]
    return "\n".join(lines)

