"""`gazetune demo`: synthetic data, a real search, its report and test evaluation, one folder."""

from __future__ import annotations

import json
import time

import pytest
from conftest import gazetune
from identifiers import scan_for_identifiers
from mlflow import MlflowClient
from test_export import assert_metric_shape, assert_png, identifiers

from search import tracking
from search.demo import run_demo
from search.export import BEST_CONFIGS, best_epoch
from trainable.data import load_cache
from trainable.errors import GazetuneError


def test_demo_refuses_a_folder_that_holds_a_demo(tmp_path):
    (tmp_path / "reports" / "demo").mkdir(parents=True)
    with pytest.raises(GazetuneError, match="has run in .* already"):
        run_demo(tmp_path)
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # a Ray search of two trials: 2-5 minutes on the shared 2-core machine
def test_small_demo_end_to_end(tmp_path):
    start = time.monotonic()
    done = gazetune("demo", "--workdir", str(tmp_path), "--images", "90", "--trials", "2",
                    "--epochs", "2", check=False)
    print(f"small demo: {time.monotonic() - start:.0f} s\n{done.stdout[-3000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = tmp_path / "reports" / "demo"
    assert f"report:  {report / 'summary.md'}" in done.stdout
    assert (f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'} --host 127.0.0.1"
            in done.stdout)
    for folder in ("data", "cache", "mlartifacts", "ray_results/demo"):
        assert (tmp_path / folder).is_dir(), folder

    # The report of a real search: each trial scored at its best validation epoch.
    uri = tracking.resolve_tracking_uri(None, tmp_path)
    client = MlflowClient(uri)
    items = json.loads((report / BEST_CONFIGS).read_text())
    assert len(items) == 2
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
    assert {"summary.md", "evaluation.md", BEST_CONFIGS, "evaluation.json"} <= {
        p.name for p in report.iterdir()}
    # Everything the demo wrote, apart from the synthetic release it made itself: Tune's
    # storage, the MLflow store and artifacts, the report hold no release identifier and no
    # cache uid; the cache holds its uids (its keys, salted hashes) and nothing else.
    secrets = identifiers(tmp_path / "data", tmp_path / "cache")
    written = [p for p in tmp_path.iterdir() if p.name not in ("data", "cache")]
    assert {"mlflow.db", "mlartifacts", "ray_results", "reports"} <= {p.name for p in written}
    assert scan_for_identifiers(written, secrets) == []
    uids = {str(uid) for uid in load_cache(tmp_path / "cache").uids}
    assert scan_for_identifiers([tmp_path / "cache"], secrets - uids) == []
