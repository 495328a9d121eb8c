"""What every report of a study shares: its folder, atomic files, and the lines that say what
the numbers are (the data's origin, the paper's published AUCs).

Images appear only by position and class; no identifier of the dataset reaches a report. Every
file is written to a temporary name and moved into place, so a killed export or evaluation
leaves whole files under their final names.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainable import files
from trainable.errors import GazetuneError
from trainable.files import atomic_write

BEST_CONFIGS, SUMMARY, FIGURES = "best_configs.json", "summary.md", "figures"
# `evaluate --all-configurations`: the test table of every configuration and its chart.
CONFIGURATIONS_JSON, CONFIGURATIONS_MD = "configurations.json", "configurations.md"
CONFIGURATIONS_PNG = "configurations.png"
# `gazetune repeat`: the best trials retrained over seeds.
REPEAT_JSON, REPEAT_MD, REPEAT_PNG = "repeat.json", "repeat.md", "repeat.png"

# Watanabe et al. 2022, as published: mean (auc, lo, hi) and per-class AUC on their test
# split of about 100 images. Keys: (loss_set, generator or None).
PAPER = {
    ("baseline", None): ("baseline U-Net", (0.872, 0.840, 0.897), (0.923, 0.916, 0.781)),
    ("classifier", None): ("classifier only", (0.873, 0.838, 0.908), (0.878, 0.934, 0.805)),
    ("set1", "guided_backprop"): ("set1 guided backprop", (0.891, 0.847, 0.939),
                                  (0.896, 0.946, 0.831)),
    ("set1", "deconvnet"): ("set1 deconvnet", (0.884, 0.843, 0.935), (0.916, 0.935, 0.806)),
    ("set2", "guided_backprop"): ("set2 guided backprop", (0.897, 0.848, 0.921),
                                  (0.907, 0.922, 0.850)),
    ("set2", "deconvnet"): ("set2 deconvnet", (0.881, 0.828, 0.907), (0.885, 0.922, 0.827)),
    ("set3", "guided_backprop"): ("set3 guided backprop", (0.913, 0.860, 0.966),
                                  (0.921, 0.962, 0.859)),
    ("set3", "deconvnet"): ("set3 deconvnet", (0.860, 0.806, 0.907), (0.907, 0.934, 0.741)),
}


# What a reader must know about the data before reading any AUC of a report.
DATA_NOTES = {
    "synthetic": "**Data: synthetic** (`gazetune synth`: phantom radiographs with simulated "
                 "gaze, no patient). These AUCs show that the pipeline learns; they say nothing "
                 "clinical and are not comparable with the paper's numbers on the real release.",
    "real": "Data: prepared from a release in the EGD-CXR / MIMIC-CXR layout (real "
            "radiographs).",
    "unknown": "Data: the trial's cache could not be read here, so whether it is synthetic or "
               "real is not known.",
}
PAPER_SOURCE = "paper: test split of the real release"


def format_auc(value) -> str:
    """[auc, lo, hi] as "0.812 (0.750–0.870)"; "–" when there is no AUC."""
    auc, lo, hi = value
    if auc is None:
        return "–"
    interval = f" ({lo:.3f}–{hi:.3f})" if lo is not None and hi is not None else ""
    return f"{auc:.3f}{interval}"



# export always writes best_configs.json, evaluate evaluation.json (configurations.json with
# --all-configurations), repeat repeat.json: a folder with any of them is a report of this tool.
REPORT_MARKS = (BEST_CONFIGS, "evaluation.json", CONFIGURATIONS_JSON, REPEAT_JSON)


def claim_report_folder(out: Path) -> Path:
    """`out`, created with its figures/ folder, unless it already holds files and is not a
    report this tool wrote (then nothing is written).

    Raises:
        GazetuneError: `out` is a file, or a folder with other content and no report in it.
    """
    if out.exists() and not out.is_dir():
        raise GazetuneError(f"{out} is a file, not a report folder")
    # An empty figures/ folder is what a claim before a failed evaluation leaves.
    content = [p for p in out.iterdir() if not (p.name == FIGURES and p.is_dir()
                                                and not any(p.iterdir()))] if out.is_dir() else []
    if content and not any((out / mark).is_file() for mark in REPORT_MARKS):
        raise GazetuneError(f"{out} holds files that gazetune did not write: reports go into a "
                            f"new folder or one that export or evaluate wrote (choose another "
                            f"--reports)")
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    return out


def record_report(uri: str, study: str, run_name: str, kind: str, parent: str | None,
                  metrics: dict, params: dict, out: Path, result: dict,
                  names: tuple[str, str, str], markdown) -> None:
    """A report of a study as one MLflow run: `metrics` and `params` logged, `result` written
    as the JSON and `markdown(result)` as the Markdown of `names` (json, md, png under
    figures/, the png drawn before), all three as the run's artifacts; the run is tagged
    `gazetune.kind` = `kind` under the search's `parent` run, and once it is FINISHED the
    study's earlier runs of that kind are deleted, so a rerun replaces it. `result` gets the
    run's id (`evaluation_run_id`) before it is written."""
    from search import tracking

    json_name, md_name, png_name = names
    tags = {"gazetune.kind": kind, **({tracking.PARENT_TAG: parent} if parent else {})}
    with tracking.evaluation_run(uri, study, run_name=run_name, tags=tags) as run:
        run.log(metrics, params)
        result["evaluation_run_id"] = run.run_id
        write_json(out / json_name, result)
        write_text(out / md_name, markdown(result))
        run.log_artifact(out / json_name)
        run.log_artifact(out / md_name)
        run.log_artifact(out / FIGURES / png_name, FIGURES)
    tracking.delete_other_runs(uri, study, kind, keep=run.run_id)


def write_json(path: Path, obj) -> None:
    """Strict JSON (NaN refused: missing values are null), written atomically."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: files.write_bytes(tmp, data))
