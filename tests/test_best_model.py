"""The best checkpoint as an MLflow Model: `gazetune export --register`, the model loaded in a
fresh process by `mlflow.pyfunc.load_model`, `gazetune predict` on a public chest radiograph,
`trainable.checkpoint.load_best` on the downloaded model.

The study lives on a real `mlflow server` (HTTP, proxied artifacts); its checkpoints are written
without training (`study_in_mlflow`, BatchNorm calibrated on the training images so that the
test images get different probabilities and the AUCs say something).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pydicom
import pytest
from helpers import assert_png, study_in_mlflow
from mlflow import MlflowClient
from pydicom.data import get_testdata_file

from search import tracking
from search.cli import main
from search.evaluate import EVALUATION_JSON, evaluate_study
from search.export import export
from trainable.checkpoint import load_best
from trainable.config import CLASS_NAMES, TrialConfig
from trainable.data import load_cache
from trainable.errors import GazetuneError
from trainable.inference import Classifier
from trainable.loop import DeviceData, predict
from trainable.metrics import bootstrap_auc

STUDY, MODEL = "best-model", "chest-xray"
# The baseline trial (a decoder: masks too) is the best, at epoch 2 of 3.
TRIALS = [({"loss_set": "baseline", "loss_weight": 1.0, "lr": 3e-3, "dropout": 0.2},
           [0.6, 0.8, 0.7], False),
          ({"loss_set": "classifier", "lr": 1e-3, "dropout": 0.5}, [0.55], False)]
RG1 = "RG1_UNCR.dcm"  # pydicom-data's chest radiograph (MONOCHROME1, 15 bits)

# A fresh interpreter that refuses to unpickle anything (pickle's and cloudpickle's readers are
# replaced before MLflow is imported), loads the registered model and prints its probabilities
# of the cache's test images.
FRESH = textwrap.dedent("""
    import json, pickle, sys

    def refuse(*args, **kwargs):
        raise AssertionError("loading the model unpickled something")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    pickle.load = pickle.loads = refuse
    pickle.Unpickler = Refused

    import mlflow.pyfunc
    import numpy as np

    model = mlflow.pyfunc.load_model(sys.argv[1])
    with np.load(sys.argv[2], allow_pickle=False) as data:
        images = data["images"][data["split"] == 2].astype(np.float32)
    frame = model.predict(images)
    print(json.dumps({"columns": list(frame.columns), "probs": frame.to_numpy().tolist()}))
""")


@pytest.fixture(scope="module")
def registered(cache90, mlflow_server, tmp_path_factory):
    """The study on the server, exported with `--register` by the command line (in this
    process: `search.cli.main`), then evaluated; (workdir, uri, export's stdout, evaluation,
    {run id: checkpoint folder}, {run id: its RunInfo before the export})."""
    workdir = tmp_path_factory.mktemp("best-model")
    checkpoints = study_in_mlflow(cache90, mlflow_server.uri, workdir / "scratch", name=STUDY,
                                  trials=TRIALS, calibrated=True)
    before = {run_id: MlflowClient(mlflow_server.uri).get_run(run_id).info
              for run_id in checkpoints}
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.chdir(workdir)
        assert main(["export", STUDY, "--register", MODEL, "--tracking-uri",
                     mlflow_server.uri]) == 0
    result = evaluate_study(STUDY, tracking_uri=mlflow_server.uri, workdir=workdir)
    return workdir, mlflow_server.uri, stdout.getvalue(), result, checkpoints, before


def test_the_registered_model_gives_evaluates_test_aucs_in_a_fresh_process(registered, cache90,
                                                                         tmp_path):
    workdir, uri, stdout, result, _, _ = registered
    assert f"registered as models:/{MODEL}/1" in stdout, stdout
    done = subprocess.run(
        [sys.executable, "-c", FRESH, f"models:/{MODEL}/1", str(cache90 / "dataset.npz")],
        cwd=tmp_path, capture_output=True, text=True, check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["columns"] == list(CLASS_NAMES)
    probs = np.array(out["probs"])
    assert probs.shape == (10, 3) and ((probs >= 0) & (probs <= 1)).all()
    assert len({tuple(row) for row in probs.round(6)}) == len(probs)  # not a constant model

    cache = load_cache(cache90)
    labels = cache.labels[cache.indices("test")]
    aucs = bootstrap_auc(labels, probs, CLASS_NAMES, n_boot=10)
    saved = json.loads((workdir / "reports" / STUDY / EVALUATION_JSON).read_text())
    assert saved["run_id"] == result["run_id"]
    for name, (auc, _lo, _hi) in aucs.items():
        assert saved["test"][name][0] is not None, name  # every class is in the test split
        assert abs(auc - saved["test"][name][0]) <= 1e-6, (name, auc, saved["test"][name])


def test_the_model_is_logged_into_the_best_trials_run_without_reopening_it(registered):
    _, uri, stdout, result, checkpoints, before = registered
    client = MlflowClient(uri)
    run_id = result["run_id"]
    assert run_id == next(iter(checkpoints))  # the baseline trial
    after = client.get_run(run_id).info
    assert (after.status, after.end_time) == (before[run_id].status, before[run_id].end_time)
    version = client.get_model_version(MODEL, "1")
    assert version.run_id == run_id
    model_uri = tracking.logged_model_uri(uri, run_id)
    assert model_uri == version.source and model_uri in stdout
    model = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert model.source_run_id == run_id and model.name == tracking.MODEL_NAME
    # The signature: float32 images at the trial's size in, one column per class out.
    signature = tracking.load_model(f"runs:/{run_id}/model", uri).metadata.signature
    assert signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 64, 64)}}]
    assert signature.outputs.input_names() == list(CLASS_NAMES)
    # The other trial has no model.
    (other,) = set(checkpoints) - {run_id}
    assert tracking.logged_model_uri(uri, other) is None


def test_registering_again_keeps_the_model_and_its_version(registered, capsys):
    workdir, uri, _, result, _, _ = registered
    capsys.readouterr()
    export(STUDY, tracking_uri=uri, workdir=workdir, register=MODEL)
    printed = capsys.readouterr().out
    assert "already logged as" in printed and f"registered as models:/{MODEL}/1" in printed
    client = MlflowClient(uri)
    assert [v.version for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"]
    models = client.search_logged_models(
        [client.get_run(result["run_id"]).info.experiment_id],
        filter_string=f"name = '{tracking.MODEL_NAME}'")
    assert len(models) == 1


def test_load_best_reads_the_downloaded_model_and_checkpoint(registered, tmp_path,
                                                            monkeypatch):
    import mlflow.artifacts
    import torch

    _, uri, _, result, checkpoints, _ = registered
    expected_state, expected_config, expected_metrics = load_best(checkpoints[result["run_id"]])
    # `models:/` URIs resolve through the process's registry (the tracking URI's by default).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1",
                                                    dst_path=str(tmp_path / "model"))
    checkpoint_dir = tracking.download_artifact(uri, result["run_id"], "checkpoint",
                                                tmp_path / "checkpoint")
    for folder in (model_dir, checkpoint_dir):
        state, config, metrics = load_best(folder)
        assert config == expected_config and metrics["epoch"] == expected_metrics["epoch"] == 2
        assert state.keys() == expected_state.keys()
        assert all(torch.equal(state[k], expected_state[k]) for k in state)
    assert load_best(model_dir)[2]["image_size"] == 64  # filled in from the cache when logged
    assert not list((tmp_path / "model").rglob("*.pkl"))  # nothing pickled in the model


def test_predict_on_the_public_chest_radiograph(registered, tmp_path, capsys, monkeypatch):
    _, uri, _, _, _, _ = registered
    path = get_testdata_file(RG1, download=False)
    assert path is not None, f"{RG1} not installed (pydicom-data is a test dependency)"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["predict", f"models:/{MODEL}/1", path, "--saliency", "panels",
                 "--tracking-uri", uri]) == 0
    done = capsys.readouterr()
    header, row = done.out.splitlines()[:2]
    assert header.split() == ["file", *CLASS_NAMES]
    assert row.startswith(path)
    probs = [float(v) for v in row[len(path):].split()]
    assert len(probs) == 3 and all(0.0 <= p <= 1.0 for p in probs)  # independent sigmoids
    assert_png(tmp_path / "panels" / "RG1_UNCR_saliency.png")
    # Nothing from the header reaches the output: file names as given only.
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SOPInstanceUID",
                    "AccessionNumber"):
        value = str(ds.get(keyword) or "").strip()
        if len(value) > 2:
            assert value not in done.out + done.err, keyword


def test_predict_writes_csv_and_the_probabilities_are_the_models(registered, tmp_path, capsys,
                                                                 monkeypatch):
    """In process: the CSV holds what the checkpoint's own network gives for the image decoded
    and resized as `prepare` does."""
    from trainable.data.cache import read_model_input

    _, uri, _, result, checkpoints, _ = registered
    path = get_testdata_file(RG1, download=False)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", f"runs:/{result['run_id']}/model", path, path, "--out", "p.csv",
                 "--tracking-uri", uri]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "file,Normal,CHF,pneumonia" and len(lines) == 3
    got = np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]])
    image = read_model_input(path, 64).astype(np.float32)
    want = Classifier.from_checkpoint(checkpoints[result["run_id"]], image_size=64) \
        .probabilities(np.stack([image, image]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_predict_refuses_bad_input_in_one_line(registered, tmp_path, capsys, monkeypatch):
    _, uri, _, _, _, _ = registered
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a radiograph")
    path = get_testdata_file(RG1, download=False)
    cases = [
        # the file is checked before the model is loaded: the bad URI is never reached
        (["predict", "models:/no-such-model/1", path, "notes.txt"], "notes.txt: not a DICOM"),
        (["predict", "models:/no-such-model/1", path], "models:/no-such-model/1"),
        (["predict", "no-such-folder", path], "model no-such-folder: no MLflow model there"),
        (["export", STUDY, "--register", "a/b"], "--register 'a/b'"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main([*argv, "--tracking-uri", uri]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "reports").exists()  # --register is checked before any work


def test_the_classifier_is_evaluations_inference(cache90, registered):
    """`Classifier` (what the logged model runs) against `trainable.loop.predict` (what
    evaluation runs) on the same checkpoint and test images: the same probabilities."""
    _, _, _, result, checkpoints, _ = registered
    folder = checkpoints[result["run_id"]]
    classifier = Classifier.from_checkpoint(folder, image_size=64)
    _state, config, _ = load_best(folder)
    cfg = TrialConfig.from_dict({**config, "checkpoint_dir": None})
    data = DeviceData(load_cache(cache90), classifier.device)
    idx = data.indices("test")
    expected, masks = predict(classifier.model, data, idx, cfg)
    got, got_masks = classifier.predict(data.cache.images[idx].astype(np.float32))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_masks, masks)
    maps = classifier.saliency(data.cache.images[idx[:2]].astype(np.float32))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.max() > 0


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 32, 32), np.float32), r"shape \(N, 64, 64\).*got float32 of shape \(2, 32, 32\)"),
    (np.zeros((64, 64), np.float32), r"got float32 of shape \(64, 64\)"),
    (np.full((1, 64, 64), 255.0), r"values outside \[0, 1\]"),
    ("not images", r"expected a float32 array"),
])
def test_the_classifier_refuses_other_images_in_one_line(registered, images, message):
    _, _, _, result, checkpoints, _ = registered
    classifier = Classifier.from_checkpoint(checkpoints[result["run_id"]], image_size=64)
    with pytest.raises(GazetuneError, match=message) as caught:
        classifier.probabilities(images)
    assert "\n" not in str(caught.value)


def test_the_pyfunc_model_refuses_another_image_size(registered):
    from mlflow.exceptions import MlflowException

    _, uri, _, _, _, _ = registered
    model = tracking.load_model(f"models:/{MODEL}/1", uri)
    with pytest.raises(MlflowException, match=re.escape("expected shape (-1, 64, 64)")):
        model.predict(np.zeros((2, 32, 32), np.float32))


def test_a_model_left_pending_is_completed_not_logged_twice(registered, tmp_path):
    """An export killed between creating the logged model and finishing it: the next one
    completes that model (here on the other trial, which has no decoder)."""
    from mlflow.entities import LoggedModelStatus

    _, uri, _, result, checkpoints, _ = registered
    (other,) = set(checkpoints) - {result["run_id"]}
    client = MlflowClient(uri)
    experiment_id = client.get_run(other).info.experiment_id
    pending = client.create_logged_model(experiment_id, name=tracking.MODEL_NAME,
                                         source_run_id=other)
    assert tracking.logged_model_uri(uri, other) is None  # not READY: not a model yet
    best = checkpoints[other] / "best"
    model_uri = tracking.log_model(uri, other, best, image_size=64)
    assert model_uri == f"models:/{pending.model_id}"
    assert client.get_logged_model(pending.model_id).status == LoggedModelStatus.READY
    assert tracking.logged_model_uri(uri, other) == model_uri
    probs = tracking.load_model(f"runs:/{other}/model", uri).predict(
        np.full((3, 64, 64), 0.5, np.float32))
    assert list(probs.columns) == list(CLASS_NAMES) and len(probs) == 3


def test_an_old_checkpoint_needs_its_image_size(registered):
    _, _, _, result, checkpoints, _ = registered
    with pytest.raises(GazetuneError, match="records no image_size"):
        Classifier.from_checkpoint(checkpoints[result["run_id"]])
