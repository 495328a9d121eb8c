"""MLflow tracking: one run per trial across retries, the contract's tags and artifacts, and a
tracking server that goes away in the middle of a trial (a real `mlflow server`)."""

import json
import shutil
import threading
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow_server import MlflowServer

from search import tracking
from search.tracking import TrackingError, TrialRun
from trainable.config import ConfigError
from trainable.loop import EpochReport

CONTRACT_KEYS = ["train/loss"] + [
    f"val/auc/{name}{suffix}"
    for name in ("mean", "Normal", "CHF", "pneumonia")
    for suffix in ("", "/lo", "/hi")
]
CONFIG = {"loss_set": "set3", "generator": "guided_backprop", "r": 0.3, "lr": 1e-3, "epochs": 4}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database: creating one costs ~10 s, copying it nothing."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(template_db, tmp_path):
    """(tracking URI, experiment id, parent run id) of a fresh study in its own SQLite store."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = tracking.resolve_tracking_uri(None, tmp_path)
    experiment_id = tracking.ensure_experiment("study", uri)
    parent = tracking.start_parent_run(experiment_id, {"name": "study", "samples": 4}, uri)
    return uri, experiment_id, parent


def epoch_report(ckdir: Path, epoch: int, auc: float, is_best: bool, figures=()) -> EpochReport:
    """What `trainable.train` hands its hook after an epoch, with made-up numbers."""
    metrics = {key: auc for key in CONTRACT_KEYS}
    metrics["train/loss"] = 1.0 / epoch
    if is_best:
        (ckdir / "best").mkdir(parents=True, exist_ok=True)
        (ckdir / "best" / "model.pt").write_text(f"weights of epoch {epoch}")
        (ckdir / "best" / "metrics.json").write_text(json.dumps({"epoch": epoch}))
    paths = {}
    for name in figures:
        (ckdir / "figures").mkdir(parents=True, exist_ok=True)
        paths[name] = ckdir / "figures" / f"{name}.png"
        paths[name].write_bytes(b"\x89PNG fake " + name.encode())
    return EpochReport(epoch, metrics, ckdir, is_best, paths)


def history(uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_tracking_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(None, Path(".")) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:///sub/x.db", tmp_path) == \
        f"sqlite:///{tmp_path}/sub/x.db"
    assert tracking.resolve_tracking_uri("http://10.0.0.1:5000", tmp_path) == \
        "http://10.0.0.1:5000"
    with pytest.raises(TrackingError, match="mlruns"):
        tracking.resolve_tracking_uri("file:///x/mlruns", tmp_path)


def test_a_retried_trial_continues_its_one_run(store, tmp_path):
    uri, experiment_id, parent = store
    first = TrialRun(uri, experiment_id, parent, "a_00001", CONFIG)
    for epoch in (1, 2):
        first.log_epoch(epoch_report(tmp_path, epoch, 0.5 + epoch / 10, is_best=True))
    # The worker dies after sending epoch 2 to MLflow but before Tune kept its checkpoint; Ray
    # retries the trial from its epoch-1 checkpoint in a new process, so epoch 2 comes again.
    retry = TrialRun(uri, experiment_id, parent, "a_00001", {**CONFIG, "checkpoint_dir": "/x"})
    assert retry.run_id == first.run_id
    assert MlflowClient(uri).get_run(first.run_id).info.status == "RUNNING"
    for epoch in (2, 3, 4):
        retry.log_epoch(epoch_report(tmp_path, epoch, 0.4, is_best=False))
    retry.finish()

    other = TrialRun(uri, experiment_id, parent, "a_00002", CONFIG)
    other.finish()
    runs = tracking.find_trial_runs(uri, "study")  # the children only, not the parent
    assert sorted(r.data.tags["ray.trial_id"] for r in runs) == ["a_00001", "a_00002"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert history(uri, first.run_id) == [1, 2, 3, 4]  # each epoch once
    assert history(uri, first.run_id, "val/auc/CHF/hi") == [1, 2, 3, 4]
    chf = MlflowClient(uri).get_metric_history(first.run_id, "val/auc/CHF")
    assert [m.value for m in sorted(chf, key=lambda m: m.step)] == [0.6, 0.7, 0.4, 0.4]
    run = MlflowClient(uri).get_run(first.run_id)
    # Params: the keys that apply to the loss set, never the trial's scratch folder.
    assert run.data.params == {k: str(v) for k, v in CONFIG.items()}
    # The best epoch (2, the last is_best) as the run's latest best/* values: what the runs
    # table shows and the report scores.
    assert run.data.metrics["best_epoch"] == 2
    assert run.data.metrics["best/val/auc/CHF"] == 0.7
    assert run.data.metrics["best/val/auc/mean/lo"] == pytest.approx(0.7)
    assert run.data.tags["pruned"] == "false"
    assert run.data.tags["loss_set"] == "set3" and run.data.tags["generator"] == "guided_backprop"
    assert run.data.tags["gazetune.version"]


def test_a_trial_run_is_named_and_tagged_for_a_person(store):
    uri, experiment_id, parent = store
    config = {"loss_set": "classifier", "generator": "deconvnet", "r": 0.9, "lr": 1e-3,
              "checkpoint_dir": "/scratch", "counterexample": "none",
              "counterexample_outline": "batch", "cls_ramp": 2.0}
    run = TrialRun(uri, experiment_id, parent, "named_1", config, number=7)
    run.finish(pruned=True)
    got = MlflowClient(uri).get_run(run.run_id)
    assert got.info.run_name == "07 classifier"
    assert got.data.tags["trial_number"] == "7" and got.data.tags["pruned"] == "true"
    assert "generator" not in got.data.tags  # a classifier computes no map
    # No generator, r or ramp (nothing beside cls), no scratch path, no outline without
    # counterexamples.
    assert set(got.data.params) == {"loss_set", "lr", "counterexample"}
    swapped = TrialRun(uri, experiment_id, parent, "named_3",
                       {**config, "counterexample": "swap"}, number=8)
    assert set(MlflowClient(uri).get_run(swapped.run_id).data.params) == {
        "loss_set", "lr", "counterexample", "counterexample_outline"}
    set3 = TrialRun(uri, experiment_id, parent, "named_2", {**config, "loss_set": "set3"},
                    number=12)
    assert MlflowClient(uri).get_run(set3.run_id).info.run_name == "12 set3 deconvnet"


def test_finished_pruned_and_failed_runs(store):
    uri, experiment_id, parent = store
    client = MlflowClient(uri)
    stopped = TrialRun(uri, experiment_id, parent, "b_1", CONFIG)
    stopped.finish(pruned=True)
    diverged = TrialRun(uri, experiment_id, parent, "b_2", CONFIG)
    diverged.finish(failure="DivergedError: loss is nan at epoch 2, step 5 (term map_gaze)")
    TrialRun(uri, experiment_id, parent, "b_3", CONFIG)  # ended from the driver below

    assert tracking.finish_trial_run(uri, experiment_id, "b_3", "FINISHED", pruned=True)
    assert tracking.finish_trial_run(uri, experiment_id, "never-started", "FAILED") is None
    runs = {r.data.tags["ray.trial_id"]: r for r in tracking.find_trial_runs(uri, "study")}
    assert runs["b_1"].info.status == "FINISHED" and runs["b_1"].data.tags["pruned"] == "true"
    assert runs["b_3"].info.status == "FINISHED" and runs["b_3"].data.tags["pruned"] == "true"
    assert runs["b_2"].info.status == "FAILED"
    assert runs["b_2"].data.tags["failure"].startswith("DivergedError: loss is nan at epoch 2")
    assert "pruned" not in runs["b_2"].data.tags

    # Retried after the failure: the same run, running again, the old reason gone.
    again = TrialRun(uri, experiment_id, parent, "b_2", CONFIG)
    run = client.get_run(again.run_id)
    assert again.run_id == diverged.run_id and run.info.status == "RUNNING"
    assert "failure" not in run.data.tags


def test_best_checkpoint_figures_and_config(store, tmp_path):
    uri, experiment_id, parent = store
    run = TrialRun(uri, experiment_id, parent, "c_1", CONFIG)
    run.log_epoch(epoch_report(tmp_path, 1, 0.6, is_best=True, figures=["Normal"]))
    run.log_epoch(epoch_report(tmp_path, 2, 0.5, is_best=False))
    run.log_epoch(epoch_report(tmp_path, 3, 0.7, is_best=True, figures=["CHF"]))
    run.finish()

    out = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, dst_path=tmp_path / "dl",
                                                   tracking_uri=uri))
    assert (out / "checkpoint" / "model.pt").read_text() == "weights of epoch 3"
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["CHF.png", "Normal.png"]
    assert json.loads((out / "config.json").read_text()) == CONFIG
    # Artifacts beside the database, never in the (per-trial) working directory.
    assert MlflowClient(uri).get_run(run.run_id).info.artifact_uri.startswith(
        (tmp_path / "mlartifacts").as_uri())


def test_parent_run_resumes_and_records_the_best(store):
    uri, experiment_id, parent = store
    client = MlflowClient(uri)
    child = TrialRun(uri, experiment_id, parent, "d_1", CONFIG)
    child.finish()
    # The search is resumed: the same parent run, reopened; a new setting is added.
    same = tracking.start_parent_run(experiment_id, {"name": "study", "samples": 4,
                                                     "resumed": True}, uri, run_id=parent)
    assert same == parent and client.get_run(parent).info.status == "RUNNING"

    val = {"mean": [0.8, 0.7, 0.9], "Normal": [0.9, 0.8, 1.0], "CHF": [0.8, 0.7, 0.9],
           "pneumonia": [0.7, 0.6, 0.8]}
    tracking.log_parent_result(parent, {"run_id": child.run_id, "trial_id": "d_1", "epoch": 3,
                                        "config": CONFIG, "val": val}, uri)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["best_run_id"] == child.run_id
    assert run.data.tags["best_trial_id"] == "d_1" and run.data.tags["best_epoch"] == "3"
    assert run.data.params["best.loss_set"] == "set3" and run.data.params["resumed"] == "True"
    assert run.data.metrics["best/val/auc/mean"] == 0.8
    assert run.data.metrics["best/val/auc/pneumonia/lo"] == 0.6

    # The same from an epoch's metrics, as the search service hands them over.
    other = tracking.start_parent_run(experiment_id, {"name": "study"}, uri)
    tracking.log_parent_result(other, {"run_id": child.run_id, "config": CONFIG, "metrics": {
        "val/auc/mean": 0.8, "val/auc/mean/lo": 0.7, "val/map/cc": 0.3}}, uri)
    assert client.get_run(other).data.metrics == {"best/val/auc/mean": 0.8,
                                                  "best/val/auc/mean/lo": 0.7}


def test_retry_only_what_is_transient(monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "10")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("connection refused", error_code=INTERNAL_ERROR)
        return "ok"

    assert tracking._retry(flaky, "testing", "http://h:1") == "ok" and len(calls) == 3

    def refused():
        calls.append(1)
        raise MlflowException("bad param", error_code=INVALID_PARAMETER_VALUE)

    calls.clear()
    with pytest.raises(MlflowException, match="bad param"):
        tracking._retry(refused, "testing", "http://h:1")
    assert len(calls) == 1  # a deliberate answer is not retried


@pytest.mark.slow  # two real epochs: 1-3 minutes on the shared 2-core machine
def test_train_logged_records_one_finished_run(small_cache, tmp_path, monkeypatch, template_db):
    """`gazetune train`: one run, no Ray, logged like a trial; a bad config ends it FAILED."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(template_db, tmp_path / "mlflow.db")  # the embedded default, ./mlflow.db
    config = {"cache": str(small_cache), "loss_set": "classifier", "epochs": 2, "batch_size": 8,
                  "n_boot": 100, "figures": 1, "threads": 2}
    tracking.train_logged(config, experiment="one-off", tracking_uri=None)
    with pytest.raises(ConfigError, match="schedule"):
        tracking.train_logged({**config, "schedule": "warp"}, experiment="one-off",
                              tracking_uri=None)

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = {r.info.status: r for r in tracking.find_trial_runs(uri, "one-off")}
    assert set(runs) == {"FINISHED", "FAILED"}
    done = runs["FINISHED"]
    assert set(CONTRACT_KEYS) <= set(done.data.metrics)
    assert history(uri, done.info.run_id, "val/auc/mean") == [1, 2]
    assert done.data.params["epochs"] == "2" and "checkpoint_dir" not in done.data.params
    names = {a.path for a in MlflowClient(uri).list_artifacts(done.info.run_id)}
    assert {"checkpoint", "figures", "config.json"} <= names
    assert "schedule" in runs["FAILED"].data.tags["failure"]


def test_artifacts_over_http(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    experiment_id = tracking.ensure_experiment("http-study", uri)
    parent = tracking.start_parent_run(experiment_id, {"name": "http-study"}, uri)
    run = TrialRun(uri, experiment_id, parent, "e_1", CONFIG)
    run.log_epoch(epoch_report(tmp_path, 1, 0.6, is_best=True, figures=["pneumonia"]))
    run.finish(pruned=True)

    info = MlflowClient(uri).get_run(run.run_id)
    assert info.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert info.data.tags["mlflow.parentRunId"] == parent and info.data.tags["pruned"] == "true"
    out = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="checkpoint",
                                                   dst_path=tmp_path / "dl", tracking_uri=uri))
    assert (out / "model.pt").read_text() == "weights of epoch 1"
    assert (mlflow_server.root / "mlartifacts").is_dir()


# Two server starts (~35 s on the 2-core machine): a repeat, at the level of one trial's run,
# of what the slow suite's search outages check (test_mlflow_outage), for a person to run.
@pytest.mark.soak
def test_a_server_outage_loses_no_metric(tmp_path, monkeypatch):
    """Stopped mid-trial: a call gives up after its retry budget with a message naming the
    server, its metrics wait in the trial, and the next call after the restart sends them."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        uri = server.uri
        experiment_id = tracking.ensure_experiment("outage", uri)
        run = TrialRun(uri, experiment_id, None, "f_1", CONFIG)
        run.log_epoch(epoch_report(tmp_path, 1, 0.6, is_best=False))

        server.stop()
        monkeypatch.setenv(tracking.RETRY_ENV, "1")
        with pytest.raises(TrackingError, match=f"{uri} unreachable for 1 s"):
            run.log_epoch(epoch_report(tmp_path, 2, 0.6, is_best=False))

        # Back in a few seconds, on the same port, while the trial is already retrying.
        monkeypatch.setenv(tracking.RETRY_ENV, "120")
        restart = threading.Thread(target=server.start)
        restart.start()
        run.log_epoch(epoch_report(tmp_path, 3, 0.6, is_best=False))
        restart.join()
        run.finish()
        assert history(uri, run.run_id) == [1, 2, 3]
        assert history(uri, run.run_id, "val/auc/mean/lo") == [1, 2, 3]
        assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"
    finally:
        server.stop()
