"""`gazetune repeat NAME --top N --seeds K`: the best trials retrained with new seeds as the
trials of a real Ray search, each model tested, mean ± sd over seeds equal to numpy on each
seed's own test AUC, the two-level bootstrap equal to scikit-learn on the same resamples, a
rerun that trains nothing again and replaces its MLflow run, and refusals before any work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_png, study_in_mlflow
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from search import tracking
from search.cli import main
from search.evaluate import evaluate_study
from search.repeat import KIND, repeat
from search.reporting import REPEAT_JSON, REPEAT_MD, REPEAT_PNG
from search.study import read_trials
from trainable.config import CLASS_NAMES
from trainable.errors import GazetuneError
from trainable.metrics import resample_indices, seeds_bootstrap_auc

STUDY, N_BOOT = "src", 200
# (config, validation mean AUC per epoch, pruned): classifier, then baseline, are the top two.
TRIALS = [
    ({"loss_set": "set2", "generator": "gradient"}, [0.50, 0.55], True),
    ({"loss_set": "classifier", "dropout": 0.1}, [0.60, 0.70], False),
    ({"loss_set": "baseline", "seed": 5}, [0.65], False),
]


@pytest.fixture(scope="module")
def repeated(cache90, tmp_path_factory):
    """The top two trials of a logged study, retrained with two seeds each for one epoch."""
    workdir = tmp_path_factory.mktemp("repeat")
    uri = tracking.resolve_tracking_uri(None, workdir)
    study_in_mlflow(cache90, uri, workdir / "scratch", name=STUDY, trials=TRIALS)
    result = repeat(STUDY, top=2, seeds=2, max_epochs=1, n_boot=N_BOOT, workdir=workdir)
    return workdir, uri, result


def test_two_level_bootstrap_equals_sklearn_on_the_same_resamples():
    rng = np.random.default_rng(0)
    y = np.eye(3)[np.repeat([0, 1, 2], 8)]
    scores = rng.random((3, 24, 3)) + 0.5 * y  # three seeds that learnt something
    other = rng.random((2, 24, 3)) + 0.2 * y  # two seeds of a weaker configuration
    got = seeds_bootstrap_auc(y, scores, CLASS_NAMES, n_boot=50, seed=4)
    diff = seeds_bootstrap_auc(y, scores, CLASS_NAMES, n_boot=50, seed=4, reference=other)

    def auc(p, rows=slice(None)):  # mean over classes
        return np.mean([roc_auc_score(y[rows, c], p[rows, c]) for c in range(3)])

    images = resample_indices(y, 50, seed=4)
    picks = np.random.default_rng((4, 1))
    own, ref = picks.integers(0, 3, size=(50, 3)), picks.integers(0, 2, size=(50, 2))
    boot = [np.mean([auc(scores[k], rows) for k in ks]) for rows, ks in zip(images, own)]
    ref_boot = [np.mean([auc(other[k], rows) for k in ks]) for rows, ks in zip(images, ref)]
    point = np.mean([auc(s) for s in scores])
    np.testing.assert_allclose(got["mean"], [point, *np.quantile(boot, [0.025, 0.975])],
                               atol=1e-12)
    np.testing.assert_allclose(
        diff["mean"], [point - np.mean([auc(s) for s in other]),
                       *np.quantile(np.subtract(boot, ref_boot), [0.025, 0.975])], atol=1e-12)
    # Over seeds and images the interval is wider than one seed's over images alone.
    one = seeds_bootstrap_auc(y, scores[:1], CLASS_NAMES, n_boot=50, seed=4)
    assert got["mean"][2] - got["mean"][1] != one["mean"][2] - one["mean"][1]
    with pytest.raises(ValueError, match="reference"):
        seeds_bootstrap_auc(y, scores, CLASS_NAMES, reference=other[:, :5])


def test_the_top_trials_retrain_with_new_seeds_as_the_trials_of_a_search(repeated):
    _, uri, result = repeated
    sources = {t.number: t for t in read_trials(uri, STUDY)}
    runs = sorted(read_trials(uri, f"{STUDY}-repeat"), key=lambda t: t.number)
    assert [t.number for t in runs] == [0, 1, 2, 3]
    assert {t.status for t in runs} == {"FINISHED"} and not any(t.pruned for t in runs)
    # classifier (trial 1, seed 0) then baseline (trial 2, seed 5), seeds +1 and +2
    for run, (source, seed) in zip(runs, [(1, 1), (1, 2), (2, 6), (2, 7)]):
        config, original = run.config(), sources[source].config()
        assert config["seed"] == seed and config["epochs"] == 1 and run.epochs == 1
        differ = {k for k in config if config[k] != original[k]}
        assert differ == {"seed", "epochs", "threads"}, differ
    assert [row["number"] for row in result["configurations"]] == [1, 2]
    assert result["seeds"] == 2 and result["epochs"] == 1 and result["n_boot"] == N_BOOT


def test_each_seed_is_what_plain_evaluate_gives_and_the_summary_is_over_seeds(repeated):
    workdir, _, result = repeated
    first = result["configurations"][0]
    seed = first["seeds"][1]
    alone = evaluate_study(f"{STUDY}-repeat", run_id=seed["run_id"], n_boot=N_BOOT,
                           workdir=workdir, reports=workdir / "single")
    assert alone["test"] == seed["test"]
    for row in result["configurations"]:
        per_seed = [s["test"]["mean"][0] for s in row["seeds"]]
        assert len(per_seed) == 2 and per_seed[0] != per_seed[1]  # the seeds differ
        assert row["test"]["mean"][0] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert row["sd"]["mean"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
        lo, hi = row["test"]["mean"][1:]
        assert lo <= hi and lo <= max(per_seed) and hi >= min(per_seed)
    second = result["configurations"][1]
    assert first["diff"] is None
    assert second["diff"]["mean"][0] == pytest.approx(
        second["test"]["mean"][0] - first["test"]["mean"][0], abs=1e-12)
    assert first["selected_val"] == pytest.approx(0.70)


def test_report_files_and_one_mlflow_run(repeated):
    workdir, uri, result = repeated
    report = workdir / "reports" / f"{STUDY}-repeat"
    assert json.loads((report / REPEAT_JSON).read_text()) == result
    md = (report / REPEAT_MD).read_text()
    assert "| trial 1: classifier | 0.700 |" in md and "| reference |" in md
    assert "seed" in md and "two-level bootstrap" in md
    assert_png(report / "figures" / REPEAT_PNG)
    run = MlflowClient(uri).get_run(result["evaluation_run_id"])
    assert run.data.tags["gazetune.kind"] == KIND
    assert run.data.metrics["trial1/test/auc/mean"] == result["configurations"][0]["test"][
        "mean"][0]
    assert run.data.metrics["trial2/test/auc/mean/sd"] == result["configurations"][1]["sd"][
        "mean"]
    assert run.data.params["trial2"] == "baseline"


def test_a_rerun_trains_nothing_and_replaces_its_run(repeated, capsys):
    workdir, uri, result = repeated
    before = {t.run_id for t in read_trials(uri, f"{STUDY}-repeat")}
    again = repeat(STUDY, top=2, seeds=2, max_epochs=1, n_boot=N_BOOT, workdir=workdir)
    assert "have ended; scoring them" in capsys.readouterr().out
    assert {t.run_id for t in read_trials(uri, f"{STUDY}-repeat")} == before
    assert again["configurations"] == result["configurations"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(f"{STUDY}-repeat")
    kept = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`gazetune.kind` = '{KIND}'")
    assert [r.info.run_id for r in kept] == [again["evaluation_run_id"]]


def test_refusals_before_any_work(repeated, capsys):
    workdir, uri, _ = repeated
    with pytest.raises(GazetuneError, match=r"trials 1, 2 of study 'src' with 2 seeds.*"
                                            r"trials 1, 2, 0 .*pass --name"):
        repeat(STUDY, top=3, seeds=2, max_epochs=1, workdir=workdir)
    with pytest.raises(GazetuneError, match="has 3 finished trial"):
        repeat(STUDY, top=4, workdir=workdir, repeat_name="other")
    with pytest.raises(GazetuneError, match="no study 'nope'"):
        repeat("nope", workdir=workdir)
    assert MlflowClient(uri).get_experiment_by_name("other") is None
    for argv, message in ((["--seeds", "1"], "--seeds must be an integer in [2, 100]"),
                          (["--top", "0"], "--top must be an integer in [1, 100]"),
                          (["--name", "../x"], "--name '../x'")):
        assert main(["repeat", STUDY, *argv, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gazetune repeat: ") and message in err and err.count("\n") == 1
