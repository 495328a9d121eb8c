"""A search against a tracking server with MLflow's basic-auth app, as `cluster.yaml` runs it:
the credentials in the driver's environment reach the trials in Ray's workers."""

from __future__ import annotations

import os
import secrets

import pytest
from helpers import gazetune
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from search import tracking


@pytest.mark.slow  # a server start and a search of two one-epoch trials: 1-2 minutes
def test_a_search_logs_to_a_server_with_authentication(small_cache, tmp_path, monkeypatch):
    password = secrets.token_urlsafe(16)
    with MlflowServer(tmp_path / "server", admin_password=password) as server:
        # Without credentials the server refuses: one line, before any training.
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        done = gazetune("search", "--name", "auth", "--cache", str(small_cache), "--samples",
                        "1", "--max-epochs", "1", "--grace-period", "1", "--tracking-uri",
                        server.uri, "--set", "n_boot=50", "figures=0", cwd=tmp_path,
                        check=False)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "ray_results" / "auth").exists()

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "gazetune")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        done = gazetune("search", "--name", "auth", "--cache", str(small_cache), "--samples",
                        "2", "--max-epochs", "1", "--grace-period", "1", "--max-concurrent",
                        "2", "--tracking-uri", server.uri, "--set", "n_boot=50", "figures=0",
                        cwd=tmp_path, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs = tracking.find_trial_runs(server.uri, "auth")
        assert len(runs) == 2
        client = MlflowClient(server.uri)
        for run in runs:
            assert run.info.status == "FINISHED"
            assert client.get_metric_history(run.info.run_id, "val/auc/mean")
            # The password is nowhere in what MLflow keeps of the run.
            assert password not in str(run.data.params) + str(run.data.tags)
        assert password not in "".join(
            p.read_text(errors="ignore") for p in (tmp_path / "ray_results").rglob("*")
            if p.is_file() and p.suffix in (".json", ".txt", ".csv", ".log"))
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "gazetune"
