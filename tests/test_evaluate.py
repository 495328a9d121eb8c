"""`gazetune evaluate`: the best checkpoint pulled from a real `mlflow server` over HTTP and
evaluated on the test split; evaluation.{json,md}, panels, best_configs.json and an MLflow run.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from helpers import assert_metric_shape, assert_png, identifiers, study_in_mlflow
from identifiers import scan_for_identifiers
from mlflow import MlflowClient

from search.evaluate import EVALUATION_JSON, EVALUATION_MD, PANELS, evaluate_study
from search.export import export
from search.reporting import BEST_CONFIGS
from search.study import ranked_trials, read_trials
from trainable.checkpoint import load_best
from trainable.config import TrialConfig
from trainable.data import load_cache
from trainable.errors import GazetuneError
from trainable.loop import DeviceData, evaluate
from trainable.model import build_model

STUDY = "tiny-http"
# One trial whose best epoch (2) is not its last: its checkpoint must be that epoch's.
TRIALS = [({"loss_set": "baseline", "loss_weight": 1.0, "lr": 3e-3, "dropout": 0.2},
           [0.6, 0.8, 0.7], False)]


@pytest.fixture(scope="module")
def evaluated(small_cache, mlflow_server, tmp_path_factory):
    """A study on the tracking server, exported, then evaluated with the defaults."""
    workdir = tmp_path_factory.mktemp("evaluate")
    checkpoints = study_in_mlflow(small_cache, mlflow_server.uri, workdir / "scratch",
                                  name=STUDY, trials=TRIALS)
    export(STUDY, tracking_uri=mlflow_server.uri, workdir=workdir)
    result = evaluate_study(STUDY, tracking_uri=mlflow_server.uri, workdir=workdir)
    return workdir, mlflow_server.uri, result, checkpoints


def test_evaluation_json_shape(evaluated, small_cache):
    workdir, _uri, result, checkpoints = evaluated
    report = workdir / "reports" / STUDY
    saved = json.loads((report / EVALUATION_JSON).read_text())
    assert saved == result
    (run_id,) = checkpoints
    assert saved["run_id"] == run_id and saved["split"] == "test"
    assert saved["protocol"] == "stratified" and saved["n_boot"] == 2000
    assert_metric_shape(saved["test"])
    assert_metric_shape(saved["val"])
    test_idx = load_cache(small_cache).indices("test")
    assert saved["images"]["total"] == len(test_idx)
    assert sum(saved["images"][c] for c in ("Normal", "CHF", "pneumonia")) == len(test_idx)
    assert set(saved["agreement"]) == {"map", "mask"}  # baseline: a generator map and a mask
    assert set(saved["agreement"]["mask"]) == {"cc", "kl", "nss"}
    assert "| test |" in (report / EVALUATION_MD).read_text()
    assert_png(report / "figures" / PANELS)


def test_the_pulled_checkpoint_gives_the_best_epochs_test_metrics(evaluated, small_cache):
    # The same numbers as evaluating the trial's own best/ folder directly: the checkpoint that
    # came over HTTP is the best validation epoch's, and the test split is the one evaluated.
    _, _, result, checkpoints = evaluated
    (folder,) = checkpoints.values()
    state, config, saved = load_best(folder)
    assert saved["epoch"] == result["epoch"]
    cfg = TrialConfig.from_dict({**config, "n_boot": 0, "checkpoint_dir": None})
    model = build_model(cfg)
    model.load_state_dict(state)
    data = DeviceData(load_cache(small_cache), next(model.parameters()).device)
    metrics, _ = evaluate(model, data, data.indices("test"), cfg, prefix="test")
    for name, (auc, lo, hi) in result["test"].items():
        expected = [metrics[f"test/auc/{name}{b}"] for b in ("", "/lo", "/hi")]
        got = [math.nan if v is None else v for v in (auc, lo, hi)]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert result["agreement"]["mask"]["cc"] == pytest.approx(metrics["test/mask/cc"])


def test_test_is_filled_in_best_configs(evaluated):
    workdir, _, result, _ = evaluated
    items = json.loads((workdir / "reports" / STUDY / BEST_CONFIGS).read_text())
    assert items[0]["run_id"] == result["run_id"]
    assert items[0]["test"] == result["test"]


def test_an_evaluation_run_links_to_the_trials_run(evaluated):
    _, uri, result, _ = evaluated
    client = MlflowClient(uri)
    run = client.get_run(result["evaluation_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["evaluates"] == result["run_id"]
    assert run.data.tags["gazetune.kind"] == "evaluation"
    assert run.info.experiment_id == client.get_experiment_by_name(STUDY).experiment_id
    for name, (auc, _, _) in result["test"].items():
        if auc is not None:
            assert run.data.metrics[f"test/auc/{name}"] == pytest.approx(auc)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {EVALUATION_JSON, EVALUATION_MD, "figures"} <= artifacts
    # It is no trial: the study's trials are still the one trained.
    assert len(read_trials(uri, STUDY)) == 1


def test_no_identifier_in_the_evaluated_report(evaluated, small_dataset, small_cache):
    workdir, _, _, _ = evaluated
    secrets = identifiers(small_dataset, small_cache)
    assert scan_for_identifiers([workdir / "reports" / STUDY], secrets) == []


def test_paper_protocol_and_another_cache(evaluated, small_cache, tmp_path):
    # A copy of the cache stands for "the same data, prepared elsewhere" (--cache); the report
    # goes to a folder without best_configs.json, which evaluate then leaves alone.
    workdir, uri, _, _ = evaluated
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    result = evaluate_study(STUDY, protocol="paper", cache=copy, tracking_uri=uri,
                            reports=tmp_path / "reports", workdir=workdir)
    saved = json.loads((tmp_path / "reports" / STUDY / EVALUATION_JSON).read_text())
    assert saved == result
    assert saved["protocol"] == "paper" and saved["n_boot"] == 30
    assert saved["run_id"] == ranked_trials(read_trials(uri, STUDY))[0].run_id
    assert not (tmp_path / "reports" / STUDY / BEST_CONFIGS).exists()
    run = MlflowClient(uri).get_run(saved["evaluation_run_id"])
    assert run.data.params["cache"] == str(copy)


def test_evaluate_refuses_a_run_of_another_study(evaluated):
    workdir, uri, _, _ = evaluated
    with pytest.raises(GazetuneError, match="run 0123abcd is not a trial of study"):
        evaluate_study(STUDY, run_id="0123abcd", tracking_uri=uri, workdir=workdir)


def test_evaluate_names_a_missing_cache(evaluated, tmp_path):
    workdir, uri, _, _ = evaluated
    with pytest.raises(GazetuneError, match="does not exist here: pass --cache"):
        evaluate_study(STUDY, cache=tmp_path / "gone", tracking_uri=uri, workdir=workdir)


def test_evaluate_refuses_a_cache_of_other_data(evaluated, tmp_path):
    """Another release's cache would put its test split into this study's report."""
    from synthetic.release import synthesize
    from trainable.data.cache import prepare

    workdir, uri, _, _ = evaluated
    report = workdir / "reports" / STUDY / EVALUATION_JSON
    before = report.read_bytes()
    synthesize(tmp_path / "other", n_images=60, seed=3, verbose=False)
    prepare(tmp_path / "other" / "egd-cxr", tmp_path / "other" / "mimic-cxr",
            tmp_path / "other-cache", size=64, workers=1, sigma=20.0)
    with pytest.raises(GazetuneError, match="not the cache trial 0 trained on"):
        evaluate_study(STUDY, cache=tmp_path / "other-cache", tracking_uri=uri,
                       workdir=workdir)
    assert report.read_bytes() == before

