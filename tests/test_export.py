"""`gazetune export`: best_configs.json, summary.md and figures from a study's MLflow runs.

The study here is written without training (`study_in_mlflow`): each trial's epochs go through
the real `search.tracking.TrialRun` under a parent run, as a search logs them, with validation
AUC histories chosen by the test (so the best epoch is known and is not the last) and real
checkpoints of the trial's model. A real search, exported and evaluated, is the slow demo test
(test_demo.py).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from helpers import (
    STUDY,
    assert_metric_shape,
    assert_png,
    epoch_aucs,
    gazetune,
    identifiers,
    study_in_mlflow,
)
from identifiers import scan_for_identifiers
from mlflow import MlflowClient
from mlflow.entities import Metric

from search import tracking
from search.export import export, importances
from search.reporting import BEST_CONFIGS, PAPER
from search.study import SCORES, Trial, _by_step, best_epoch, ranked_trials, read_trials
from trainable.config import TrialConfig
from trainable.errors import GazetuneError

CONTRACT_KEYS = {"run_id", "config", "val", "test", "checkpoint_uri"}


@pytest.fixture(scope="module")
def study(small_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("export")
    uri = tracking.resolve_tracking_uri(None, workdir)
    checkpoints = study_in_mlflow(small_cache, uri, workdir / "scratch")
    report = export(STUDY, workdir=workdir)
    return workdir, uri, report, checkpoints


def test_best_configs_follow_the_contract_best_first(study):
    workdir, _uri, report, checkpoints = study
    assert report == workdir / "reports" / STUDY
    items = json.loads((report / BEST_CONFIGS).read_text())
    assert {item["run_id"] for item in items} == set(checkpoints)
    for item in items:
        assert set(item) == CONTRACT_KEYS
        assert_metric_shape(item["val"])
        assert item["test"] is None
        assert item["checkpoint_uri"] == f"runs:/{item['run_id']}/checkpoint"
        config = TrialConfig.from_dict(item["config"])  # a complete, valid trial config
        assert config.encoder_weights is None  # not the string "None" MLflow logged
    means = [item["val"]["mean"][0] for item in items]
    assert means == sorted(means, reverse=True)


def test_val_is_the_best_epoch_not_the_last(study):
    _, uri, report, checkpoints = study
    items = {item["run_id"]: item for item in json.loads((report / BEST_CONFIGS).read_text())}
    client = MlflowClient(uri)
    expected = {}
    for run_id in items:
        params = client.get_run(run_id).data.params
        expected[run_id] = {"baseline": (0.80, 2), "classifier": (0.75, 3), "set2": (0.50, 1)}[
            params["loss_set"]]
    for run_id, (auc, epoch) in expected.items():
        logged = epoch_aucs(auc)
        for name in SCORES:
            np.testing.assert_allclose(items[run_id]["val"][name], [
                logged[f"val/auc/{name}{b}"] for b in ("", "/lo", "/hi")])
        # The checkpoint the URI names holds that epoch.
        saved = json.loads((checkpoints[run_id] / "best" / "metrics.json").read_text())
        assert saved["epoch"] == epoch
    assert [items[r]["val"]["mean"][0] for r in items] == pytest.approx([0.80, 0.75, 0.50])


def test_best_epoch_is_the_first_peak_and_ignores_nan():
    assert best_epoch({1: 0.6, 2: 0.8, 3: 0.7}) == 2
    assert best_epoch({1: 0.8, 2: 0.6, 3: 0.8}) == 1  # the loop keeps the first checkpoint
    assert best_epoch({1: math.nan, 2: 0.55}) == 2
    assert best_epoch({1: math.nan}) is None
    assert best_epoch({}) is None


def test_a_step_logged_again_after_a_retry_keeps_its_latest_value():
    history = [Metric("m", 0.9, 2000, 1), Metric("m", 0.5, 1000, 1), Metric("m", 0.7, 1500, 2)]
    assert _by_step(history) == {1: 0.9, 2: 0.7}


def test_summary_has_a_row_per_configuration_beside_the_papers(study):
    _, _, report, _ = study
    summary = (report / "summary.md").read_text()
    lines = summary.splitlines()
    for method in (("baseline", None), ("classifier", None), ("set2", "deconvnet")):
        label, mean, _ = PAPER[method]
        row = next(i for i, line in enumerate(lines) if line.startswith(f"| {label} |"))
        assert "this study: synthetic validation" in lines[row]
        assert lines[row + 1].startswith("| | paper: test split of the real release | ") \
            and f"{mean[0]:.3f}" in lines[row + 1]
    # The reader learns what the data are before any number.
    assert summary.index("**Data: synthetic**") < summary.index("| model |")
    assert "ran their full budget: 2" in summary and "(pruned): 1" in summary
    # Every trial is listed, with the parameters its branch of the space searched.
    assert "| 2 | set2/deconvnet | loss_weight=0.5, lr=0.001, dropout=0.1 | pruned | 1 |" \
        in summary


def test_figures_are_valid_pngs(study):
    _, _, report, _ = study
    names = {p.name for p in (report / "figures").iterdir()}
    # No importance chart: two completed trials attribute nothing, so it is left out.
    assert {"auc_by_configuration.png", "search_history.png",
            "val_heatmaps_baseline.png", "val_heatmaps_classifier.png",
            "val_heatmaps_set2_deconvnet.png"} == names
    assert "importance.png" not in (report / "summary.md").read_text()
    for name in names:
        assert_png(report / "figures" / name)


def test_no_identifier_in_any_report_file(study, small_dataset, small_cache):
    _, _, report, _ = study
    secrets = identifiers(small_dataset, small_cache)
    assert len(secrets) > 100
    assert scan_for_identifiers([report], secrets) == []
    assert not list(report.rglob(".*"))  # no temporary file left behind


def test_export_again_keeps_the_test_results_of_an_evaluation(study):
    workdir, _, report, _ = study
    items = json.loads((report / BEST_CONFIGS).read_text())
    tested = {name: [0.7, 0.6, 0.8] for name in SCORES}
    items[0]["test"] = tested
    (report / BEST_CONFIGS).write_text(json.dumps(items))
    export(STUDY, workdir=workdir, top_k=2)
    again = json.loads((report / BEST_CONFIGS).read_text())
    assert len(again) == 2
    assert again[0]["run_id"] == items[0]["run_id"] and again[0]["test"] == tested
    assert again[1]["test"] is None


def test_cli_export_to_another_folder(study, tmp_path):
    workdir, uri, _, _ = study
    done = gazetune("export", STUDY, "--tracking-uri", uri, "--reports", str(tmp_path),
                    "--top-k", "1", cwd=workdir, check=False)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / STUDY / BEST_CONFIGS).read_text())) == 1


def test_export_of_an_unknown_study_names_it(study):
    workdir, uri, _, _ = study
    with pytest.raises(GazetuneError, match="no study 'nope'"):
        export("nope", workdir=workdir)
    assert [t.state for t in read_trials(uri, STUDY)] == ["COMPLETE", "COMPLETE", "PRUNED"]


def _trial(number: int, value: float | None, state: str = "COMPLETE", **params) -> Trial:
    config = TrialConfig.from_dict(params).to_dict()
    return Trial(run_id=f"r{number}", number=number,
                 status="FINISHED" if state != "FAIL" else "FAILED", pruned=state == "PRUNED",
                 params={k: str(v) for k, v in config.items()}, epochs=3, epoch=3,
                 val=None if value is None else {"mean": [value, value - 0.1, value + 0.1]})


def test_importances_leave_out_conditional_parameters_and_pruned_trials():
    rng = np.random.default_rng(0)
    trials = []
    for i in range(12):
        lr = float(10 ** rng.uniform(-5, -2))
        loss_set = ("classifier", "set1", "set3")[i % 3]
        params = {"loss_set": loss_set, "lr": lr, "dropout": float(rng.uniform(0, 0.5))}
        if loss_set != "classifier":
            params.update(generator="deconvnet", loss_weight=1.0)
        if loss_set == "set3":
            params["r"] = 0.5
        # The score follows the learning rate only.
        trials.append(_trial(i + 1, 0.5 + 0.1 * (math.log10(lr) + 5), **params))
    trials.append(_trial(13, 0.99, "PRUNED", loss_set="classifier", lr=1e-3, dropout=0.1))
    values, note = importances(trials, "paper")
    assert set(values) == {"loss_set", "lr", "dropout"}  # generator, r, loss_weight: conditional
    assert max(values, key=values.get) == "lr"
    assert note == "fANOVA over 12 completed trials"


def test_importances_of_too_few_trials_are_empty_with_a_reason():
    trials = [_trial(1, 0.6, lr=1e-3), _trial(2, 0.7, lr=1e-4), _trial(3, None, "FAIL")]
    values, note = importances(trials, "paper")
    assert values == {} and "too few" in note


def test_importances_leave_out_what_never_varied():
    """The paper points share lr and dropout: fANOVA must not rank what did not vary."""
    trials = [_trial(i + 1, score, loss_set=loss_set, lr=1e-3, dropout=0.5)
              for i, (loss_set, score) in enumerate([("classifier", 0.9), ("classifier", 0.8),
                                                     ("baseline", 0.6), ("baseline", 0.7)])]
    values, _ = importances(trials, "paper")
    assert set(values) == {"loss_set"}
    same = [_trial(i + 1, 0.5 + i / 10, loss_set="classifier", lr=1e-3, dropout=0.5)
            for i in range(4)]
    values, note = importances(same, "paper")
    assert values == {} and "no parameter varied" in note


def test_evaluating_another_trial_writes_beside_the_best_trials_files(study, tmp_path):
    from search.evaluate import EVALUATION_JSON, evaluate_study

    workdir, uri, report, _ = study
    reports = tmp_path / "reports"
    shutil.copytree(report, reports / STUDY)
    best = evaluate_study(STUDY, tracking_uri=uri, reports=reports, workdir=workdir)
    kept = (reports / STUDY / EVALUATION_JSON).read_bytes()
    other = next(t for t in ranked_trials(read_trials(uri, STUDY)) if t.run_id != best["run_id"])
    result = evaluate_study(STUDY, run_id=other.run_id, tracking_uri=uri, reports=reports,
                            workdir=workdir)
    folder = reports / STUDY
    assert (folder / EVALUATION_JSON).read_bytes() == kept  # the best trial's, untouched
    assert json.loads((folder / f"evaluation-trial-{other.number}.json").read_text()) == result
    assert (folder / "figures" / f"test_heatmaps_trial-{other.number}.png").is_file()
    assert f"test_heatmaps_trial-{other.number}.png" in (
        folder / f"evaluation-trial-{other.number}.md").read_text()


def test_export_never_writes_into_a_folder_it_did_not_write(study, tmp_path):
    workdir, uri, _, _ = study
    foreign = tmp_path / "reports" / STUDY
    foreign.mkdir(parents=True)
    (foreign / "summary.md").write_text("a researcher's notes")
    with pytest.raises(GazetuneError, match="holds files that gazetune did not write"):
        export(STUDY, tracking_uri=uri, reports=tmp_path / "reports", workdir=workdir)
    assert [p.name for p in foreign.iterdir()] == ["summary.md"]
    assert (foreign / "summary.md").read_text() == "a researcher's notes"
    # A folder export wrote itself is written again.
    export(STUDY, tracking_uri=uri, reports=tmp_path / "again", workdir=workdir)
    export(STUDY, tracking_uri=uri, reports=tmp_path / "again", workdir=workdir)
