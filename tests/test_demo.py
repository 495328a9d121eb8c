"""`gazetune demo`: synthetic data, a real search, its report and test evaluation, one folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    assert_complete_history,
    assert_metric_shape,
    assert_png,
    identifiers,
    trial_runs,
)
from identifiers import scan_for_identifiers
from mlflow import MlflowClient
from optuna.trial import TrialState

from search import tracking
from search.demo import EPOCHS, TRIALS, run_demo
from search.reporting import BEST_CONFIGS
from search.searcher import load_study
from search.settings import SearchSettings
from search.study import best_epoch
from spaces import PAPER_POINTS
from trainable.data import load_cache
from trainable.errors import GazetuneError


def test_demo_refuses_a_folder_that_holds_a_demo(tmp_path):
    (tmp_path / "reports" / "demo").mkdir(parents=True)
    with pytest.raises(GazetuneError, match="has run in .* already"):
        run_demo(tmp_path)
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


# What the README promises of the demo's best trial on the test split.
DEMO_TEST_AUC, DEMO_TEST_LOWER = 0.85, 0.75


@pytest.mark.slow  # the README's demo, full size: 10-13 minutes on the 2-core machine
def test_the_readme_demo_in_a_fresh_clone(tmp_path):
    """`gazetune demo` with a fresh clone of this repository as the working directory."""
    repo = Path(__file__).resolve().parents[1]
    clone = tmp_path / "gazetune"
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
    env = {**os.environ, "PYTHONPATH": str(clone)}  # the clone's code, not the installed one
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "search", "demo"], cwd=clone, env=env,
                          capture_output=True, text=True, check=False)
    print(f"demo in a fresh clone: {time.monotonic() - start:.0f} s\n{done.stdout[-4000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = clone / "reports" / "demo"
    assert f"report:  {report / 'summary.md'}" in done.stdout
    assert (f"mlflow ui --backend-store-uri sqlite:///{clone / 'mlflow.db'} --host 127.0.0.1"
            in done.stdout)
    # Everything the demo wrote is ignored by git: the clone stays clean.
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", status

    # The best trial learnt: its test AUC and the interval's lower bound.
    evaluation = json.loads((report / "evaluation.json").read_text())
    auc, lo, hi = evaluation["test"]["mean"]
    print(f"best trial's test mean AUC {auc:.3f} ({lo:.3f}-{hi:.3f})")
    assert auc >= DEMO_TEST_AUC and lo >= DEMO_TEST_LOWER, evaluation["test"]
    assert evaluation["data"] == "synthetic"
    for name in ("summary.md", "evaluation.md"):
        assert "**Data: synthetic**" in (report / name).read_text(), name

    # The search behind it: one finished MLflow run per trial with its complete history,
    # the paper's points run to the budget, ASHA's stops tagged and seen by Optuna as pruned,
    # the parent run naming the best.
    runs = trial_runs(clone, "demo")
    assert len(runs) == TRIALS
    for run, steps in runs.values():
        assert run.info.status == "FINISHED"
        epochs = max(steps["train/loss"])
        assert_complete_history(steps, epochs)
        assert (run.data.tags.get("pruned") == "true") == (epochs < EPOCHS)
        if int(run.data.tags["trial_number"]) < len(PAPER_POINTS):  # never stopped by ASHA
            assert epochs == EPOCHS, run.info.run_name
        artifacts = {a.path for a in MlflowClient(tracking.resolve_tracking_uri(
            None, clone)).list_artifacts(run.info.run_id)}
        assert {"checkpoint", "config.json"} <= artifacts
    states = [t.state for t in load_study(clone / "ray_results" / "demo").trials]
    pruned = sum(run.data.tags.get("pruned") == "true" for run, _ in runs.values())
    assert states.count(TrialState.PRUNED) == pruned
    assert states.count(TrialState.COMPLETE) == TRIALS - pruned
    settings = SearchSettings.load(str(clone / "ray_results" / "demo"))
    client = MlflowClient(settings.tracking_uri)
    parent = client.get_run(settings.parent_run_id)
    assert parent.info.status == "FINISHED"
    best = {run.info.run_id: max(m.value for m in client.get_metric_history(
        run.info.run_id, "val/auc/mean")) for run, _ in runs.values()}
    assert parent.data.metrics["best/val/auc/mean"] == best[parent.data.tags["best_run_id"]]
    assert best[parent.data.tags["best_run_id"]] == max(best.values())
    # The trials left their state in the search's storage only: Ray never empties its session
    # folder, where each trial's working directory lies.
    session = (Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "session_latest").resolve()
    working_dirs = list(session.glob("artifacts/*/demo/working_dirs/*"))
    assert len(working_dirs) == TRIALS
    assert [p for d in working_dirs for p in d.glob("state-*")] == []

    # The report of a real search: each trial scored at its best validation epoch.
    uri = tracking.resolve_tracking_uri(None, clone)
    client = MlflowClient(uri)
    items = json.loads((report / BEST_CONFIGS).read_text())
    assert len(items) == min(10, TRIALS)  # the top ten, best first
    # The test table of the paper's eight configurations, each against the classifier.
    table = (report / "configurations.md").read_text()
    assert table.count("| set") == 6 and "| baseline |" in table
    assert "| classifier | 1 (epoch " in table and "| reference |" in table
    for item in items:
        history = {m.step: m.value for m in client.get_metric_history(item["run_id"],
                                                                      "val/auc/mean")}
        assert item["val"]["mean"][0] == pytest.approx(history[best_epoch(history)])
        assert_metric_shape(item["val"])
        assert client.get_run(item["run_id"]).info.status == "FINISHED"

    evaluation = json.loads((report / "evaluation.json").read_text())
    assert evaluation["run_id"] == items[0]["run_id"]
    assert items[0]["test"] == evaluation["test"]
    assert_metric_shape(evaluation["test"])
    for png in (report / "figures").glob("*.png"):
        assert_png(png)
    assert {"summary.md", "evaluation.md", BEST_CONFIGS, "evaluation.json",
            "configurations.md", "configurations.json"} <= {p.name for p in report.iterdir()}
    # Everything the demo wrote, apart from the synthetic release it made itself: Tune's
    # storage, the MLflow store and artifacts, the report hold no release identifier and no
    # cache uid; the cache holds its uids (its keys, salted hashes) and nothing else.
    secrets = identifiers(clone / "data", clone / "cache")
    written = [clone / name for name in ("mlflow.db", "mlartifacts", "ray_results", "reports")]
    assert all(p.exists() for p in written)
    assert scan_for_identifiers(written, secrets) == []
    uids = {str(uid) for uid in load_cache(clone / "cache").uids}
    assert scan_for_identifiers([clone / "cache"], secrets - uids) == []
