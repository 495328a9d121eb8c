"""`gazetune evaluate NAME --all-configurations`: the best trial of every loss set x generator
on the test split, each row equal to plain `evaluate` of that trial, paired differences against
the classifier-only model equal to scikit-learn's AUCs on the same resamples, a chart, one MLflow
run that a rerun replaces, and a study without a classifier said to have no reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_metric_shape, assert_png, study_in_mlflow
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from search import evaluate as evaluate_module
from search import tracking
from search.cli import build_parser
from search.configurations import KIND, evaluate_configurations
from search.evaluate import evaluate_study
from search.reporting import CONFIGURATIONS_JSON, CONFIGURATIONS_MD, CONFIGURATIONS_PNG
from trainable.checkpoint import load_best
from trainable.config import CLASS_NAMES, TrialConfig
from trainable.data import load_cache
from trainable.errors import GazetuneError
from trainable.figures import message_figure
from trainable.loop import DeviceData, predict
from trainable.metrics import resample_indices
from trainable.model import build_model

STUDY, N_BOOT = "configs", 100
# (config, validation mean AUC per epoch, pruned). The calibrated checkpoints are seeded by
# their best epoch, so the best epochs differ between configurations, and so do their AUCs;
# a history saves a checkpoint at each new best, so few new bests keep logging quick.
TRIALS = [
    ({"loss_set": "set2", "generator": "gradient"}, [0.50, 0.40, 0.63], True),
    ({"loss_set": "classifier"}, [0.60, 0.70], False),  # the classifier's best trial
    ({"loss_set": "classifier"}, [0.50], False),
    ({"loss_set": "baseline"}, [0.65], False),
]
ORDER = ["classifier", "baseline", "set2/gradient"]


@pytest.fixture(scope="module")
def study(cache90, tmp_path_factory):
    """The study in the embedded store of a work folder, its table written once."""
    workdir = tmp_path_factory.mktemp("configurations")
    uri = tracking.resolve_tracking_uri(None, workdir)
    checkpoints = study_in_mlflow(cache90, uri, workdir / "scratch", name=STUDY,
                                  trials=TRIALS, calibrated=True)
    result = evaluate_configurations(STUDY, n_boot=N_BOOT, workdir=workdir)
    return workdir, uri, result, checkpoints


def rows(result) -> dict:
    return {row["configuration"]: row for row in result["configurations"]}


def test_one_row_per_configuration_best_trial_first(study):
    workdir, _, result, checkpoints = study
    run_ids = list(checkpoints)
    assert [r["configuration"] for r in result["configurations"]] == ORDER
    table = rows(result)
    assert table["classifier"]["run_id"] == run_ids[1]  # the better of the two classifiers
    assert table["set2/gradient"]["epoch"] == 3 and table["set2/gradient"]["pruned"]
    assert result["reference"]["run_id"] == run_ids[1]
    assert result["n_boot"] == N_BOOT and result["protocol"] == "stratified"
    for row in result["configurations"]:
        assert_metric_shape(row["test"])
        assert_metric_shape(row["val"])
    means = {row["test"]["mean"][0] for row in result["configurations"]}
    assert len(means) == len(ORDER) and None not in means  # the AUCs tell them apart
    report = workdir / "reports" / STUDY
    assert json.loads((report / CONFIGURATIONS_JSON).read_text()) == result
    md = (report / CONFIGURATIONS_MD).read_text()
    assert "| classifier | 1 (epoch 2) |" in md and "| reference |" in md
    assert "| set2 gradient | 0 (epoch 3, pruned) |" in md
    assert_png(report / "figures" / CONFIGURATIONS_PNG)


def test_each_row_is_what_plain_evaluate_gives(study, tmp_path, monkeypatch):
    workdir, _, result, _ = study
    # Plain evaluate's heatmap panels are most of its time and none of its numbers.
    monkeypatch.setattr(evaluate_module, "_panels", lambda *_: message_figure("skipped"))
    for row in result["configurations"]:
        # the classifier is the study's best trial: plain evaluate's default
        run_id = None if row["configuration"] == "classifier" else row["run_id"]
        alone = evaluate_study(STUDY, run_id=run_id, n_boot=N_BOOT,
                               reports=tmp_path / "reports", workdir=workdir)
        assert alone["run_id"] == row["run_id"]
        assert alone["test"] == row["test"], row["configuration"]


def test_paired_difference_equals_sklearn_on_the_same_resamples(study, cache90):
    _, _, result, checkpoints = study
    table = rows(result)
    data = load_cache(cache90)
    probs = {name: _probabilities(checkpoints[table[name]["run_id"]], data)
             for name in ("classifier", "set2/gradient")}
    y = data.labels[data.indices("test")]
    idx = resample_indices(y, N_BOOT, seed=result["reference"]["seed"])

    def mean_auc(p, sample=slice(None)):
        return np.mean([roc_auc_score(y[sample, c], p[sample, c]) for c in range(len(CLASS_NAMES))])

    point = mean_auc(probs["set2/gradient"]) - mean_auc(probs["classifier"])
    boot = [mean_auc(probs["set2/gradient"], i) - mean_auc(probs["classifier"], i) for i in idx]
    expected = [point, *np.quantile(boot, [0.025, 0.975])]
    np.testing.assert_allclose(table["set2/gradient"]["diff"]["mean"], expected, atol=1e-12)
    assert point != 0  # a real difference, not two equal models
    np.testing.assert_allclose(table["classifier"]["diff"]["mean"], [0, 0, 0], atol=0)


def _probabilities(folder, cache):
    """The checkpoint's test probabilities, without anything of search."""
    state, config, _ = load_best(folder)
    cfg = TrialConfig.from_dict({**config, "checkpoint_dir": None})
    model = build_model(cfg)
    model.load_state_dict(state)
    data = DeviceData(cache, next(model.parameters()).device)
    return predict(model, data, data.indices("test"), cfg)[0]


def test_one_mlflow_run_with_every_row(study):
    _, uri, result, _ = study
    client = MlflowClient(uri)
    run = client.get_run(result["evaluation_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["gazetune.kind"] == KIND
    gradient = rows(result)["set2/gradient"]
    assert run.data.metrics["set2/gradient/test/auc/mean"] == pytest.approx(
        gradient["test"]["mean"][0])
    assert run.data.metrics["set2/gradient/diff/auc/mean/lo"] == pytest.approx(
        gradient["diff"]["mean"][1])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {CONFIGURATIONS_JSON, CONFIGURATIONS_MD, "figures"} <= artifacts


def test_without_a_classifier_the_table_says_so_and_a_rerun_replaces_its_run(cache90,
                                                                              tmp_path):
    uri = tracking.resolve_tracking_uri(None, tmp_path)
    study_in_mlflow(cache90, uri, tmp_path / "scratch", name="nocls", trials=[TRIALS[3]],
                    calibrated=True)
    first = evaluate_configurations("nocls", n_boot=N_BOOT, workdir=tmp_path)
    result = evaluate_configurations("nocls", protocol="paper", workdir=tmp_path)
    assert result["reference"] is None and result["protocol"] == "paper"
    assert result["n_boot"] == 30  # the paper protocol's default
    assert [r["configuration"] for r in result["configurations"]] == ["baseline"]
    assert result["configurations"][0]["diff"] is None
    md = (tmp_path / "reports" / "nocls" / CONFIGURATIONS_MD).read_text()
    assert "No classifier-only trial in this study" in md
    assert "| no classifier trial |" in md
    assert_png(tmp_path / "reports" / "nocls" / "figures" / CONFIGURATIONS_PNG)
    client = MlflowClient(uri)
    live = client.search_runs([client.get_experiment_by_name("nocls").experiment_id],
                              filter_string=f"tags.`gazetune.kind` = '{KIND}'")
    assert [r.info.run_id for r in live] == [result["evaluation_run_id"]]
    assert client.get_run(first["evaluation_run_id"]).info.lifecycle_stage == "deleted"


def test_refuses_an_unknown_study_and_one_without_a_finished_trial(study, cache90,
                                                                    tmp_path):
    workdir, uri, _, _ = study
    with pytest.raises(GazetuneError, match="no study 'nothing'"):
        evaluate_configurations("nothing", workdir=workdir)
    study_in_mlflow(cache90, uri, tmp_path, name="unscored",
                    trials=[({"loss_set": "classifier"}, [], False)])
    with pytest.raises(GazetuneError, match="no finished trial with a validation score"):
        evaluate_configurations("unscored", workdir=workdir)


def test_run_and_all_configurations_exclude_each_other():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "s", "--run", "abc", "--all-configurations"])
    args = build_parser().parse_args(["evaluate", "s", "--all-configurations"])
    assert args.all_configurations and args.run_id is None
