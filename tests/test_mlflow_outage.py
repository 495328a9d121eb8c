"""The MLflow tracking server stopped in the middle of a real search.

A real `mlflow server` (tests/mlflow_server.py) and a real `gazetune search` subprocess. The
server is stopped once the first trial has logged an epoch; it comes back on the same port with
the same store, either within the retry budget (the search goes on and loses nothing) or only
after the search has given up (the search stops with a message naming the server, and
`gazetune resume` completes it). `tests/test_tracking.py` shows the same for one `TrialRun`.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import assert_complete_history, gazetune, quick_set, reap_group, trial_runs
from mlflow import MlflowClient
from mlflow_server import MlflowServer

from search import tracking
from search.settings import SearchSettings
from trainable.loss_sets import LOSS_SETS

# Two trials at once: both are in flight when the server goes (one more adds a minute of CI).
SAMPLES, EPOCHS = 2, 3
# Longer than an epoch of these trials (5-15 s on the shared 2-core machine), far shorter than
# the retry budget below.
OUTAGE_S = 25
SEARCH_TIMEOUT_S = 600


def start_search(name: str, server: MlflowServer, cwd, retry_s: float) -> subprocess.Popen:
    """`gazetune search` against the server, its output to `cwd/<name>.log` (no pipe to drain)."""
    with open(cwd / f"{name}.log", "w") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "search", "search", "--name", name, "--samples",
             str(SAMPLES), "--max-epochs", str(EPOCHS), "--grace-period", "1",
             "--max-concurrent", "2", "--tracking-uri", server.uri,
             "--set", *quick_set(batch_size=16), "--cache", str(cwd.parent / "cache")],
            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", tracking.RETRY_ENV: str(retry_s)},
        )


def wait_for_first_epoch(server: MlflowServer, name: str, driver: subprocess.Popen,
                         timeout_s: float = 300) -> None:
    """Until a trial run of study `name` holds an epoch's metrics."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the search ended before the outage"
        if any(run.data.metrics for run in tracking.find_trial_runs(server.uri, name)):
            return
        time.sleep(1)
    pytest.fail(f"no epoch logged at {server.uri} within {timeout_s} s")


def finish(driver: subprocess.Popen, timeout_s: float = SEARCH_TIMEOUT_S) -> int:
    """The driver's exit status; its Ray processes reaped (killed when it overruns)."""
    try:
        return driver.wait(timeout=timeout_s)
    finally:
        reap_group(driver.pid, wait_s=10)


def assert_study_complete(server: MlflowServer, cwd, name: str) -> None:
    """One run per trial, FINISHED (tagged when pruned), every epoch logged once, and the
    parent run holding the best trial."""
    runs = trial_runs(cwd, name, uri=server.uri)
    assert len(runs) == SAMPLES
    for run, steps in runs.values():
        assert run.info.status == "FINISHED", run.data.tags.get("failure")
        epochs = max(steps["train/loss"])
        assert_complete_history(steps, epochs)
        assert (run.data.tags.get("pruned") == "true") == (epochs < EPOCHS)
    settings = SearchSettings.load(str(cwd / "ray_results" / name))
    parent = MlflowClient(server.uri).get_run(settings.parent_run_id)
    assert parent.info.status == "FINISHED"
    best = parent.data.tags["best_run_id"]
    assert best in {run.info.run_id for run, _ in runs.values()}
    assert parent.data.metrics["best/val/auc/mean"] == max(
        m.value for m in MlflowClient(server.uri).get_metric_history(best, "val/auc/mean"))
    assert_runs_tell_the_truth(server.uri, [run for run, _ in runs.values()])


def assert_runs_tell_the_truth(uri: str, runs: list) -> None:
    """What a person sees of each trial in MLflow: its number and method in its name and tags,
    only the params that apply, and the best epoch's scores as the run's best/* metrics."""
    client = MlflowClient(uri)
    assert sorted(int(run.data.tags["trial_number"]) for run in runs) == list(range(len(runs)))
    for run in runs:
        tags, params = run.data.tags, run.data.params
        loss_set = tags["loss_set"]
        uses_map = LOSS_SETS[loss_set].uses_map
        assert run.info.run_name == " ".join(
            [f"{int(tags['trial_number']):02d}", loss_set]
            + ([tags["generator"]] if uses_map else []))
        assert ("generator" in tags) == ("generator" in params) == uses_map
        assert ("r" in params) == (loss_set == "set3") and "checkpoint_dir" not in params
        assert tags["pruned"] in ("true", "false") and tags["gazetune.version"]
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                      "val/auc/mean")}
        best = max(history.values())
        assert run.data.metrics["best/val/auc/mean"] == best
        assert run.data.metrics["best_epoch"] == min(e for e, v in history.items() if v == best)
        for key in ("best/val/auc/CHF/lo", "best/val/auc/pneumonia/hi"):
            epoch_values = {m.step: m.value for m in client.get_metric_history(
                run.info.run_id, key.removeprefix("best/"))}
            assert run.data.metrics[key] == epoch_values[run.data.metrics["best_epoch"]]


@pytest.fixture
def workdir(small_cache, tmp_path):
    """`tmp_path/work`, with the session's cache reachable as `../cache`."""
    (tmp_path / "cache").symlink_to(small_cache)
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.mark.slow  # one search of 2 trials x 3 epochs and a 25 s outage: ~3-5 min on 2 cores
def test_a_short_outage_costs_time_but_no_metric(workdir):
    with MlflowServer(workdir / "server") as server:
        driver = start_search("blip", server, workdir, retry_s=240)
        try:
            wait_for_first_epoch(server, "blip", driver)
            server.stop()
            time.sleep(OUTAGE_S)
            server.start()  # same port, same store
            returncode = finish(driver)
        finally:
            reap_group(driver.pid, wait_s=0)  # whatever happened, no search left running
        output = (workdir / "blip.log").read_text()
        print(output)
        assert returncode == 0, output
        assert f"{SAMPLES}/{SAMPLES} trials done" in output
        # Some epoch ended while the server was down (the trial's warning, forwarded by Ray):
        # its metrics waited in the trial, and the complete histories say they arrived.
        assert re.search(r"failed while logging \d+ metric values", output), \
            "no epoch ended during the outage: the test did not test it"
        assert_study_complete(server, workdir, "blip")

        # export and evaluate ride out a short outage too (their reads are retried).
        for command in (["export", "blip"], ["evaluate", "blip"]):
            server.stop()
            reader = subprocess.Popen(
                [sys.executable, "-m", "search", *command, "--tracking-uri", server.uri],
                cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, tracking.RETRY_ENV: "120"})
            lines = []
            for line in reader.stdout:  # down until the command has met the outage
                lines.append(line)
                if "retrying" in line:
                    break
            server.start()
            rest, _ = reader.communicate(timeout=600)
            out = "".join(lines) + rest
            assert reader.returncode == 0, out
            assert "retrying" in out, "the command never met the outage:\n" + out
        # (The tiny cache's test split has no pneumonia, so its mean AUC is undefined.)
        report = json.loads((workdir / "reports" / "blip" / "evaluation.json").read_text())
        assert report["evaluation_run_id"] and report["test"]["CHF"][0] is not None


@pytest.mark.slow  # a search stopped by the outage, then resumed: ~3-5 min on 2 cores
def test_a_server_that_stays_down_stops_the_search_and_resume_completes_it(workdir):
    with MlflowServer(workdir / "server") as server:
        driver = start_search("down", server, workdir, retry_s=5)
        try:
            wait_for_first_epoch(server, "down", driver)
            server.stop()
            start = time.monotonic()
            returncode = finish(driver, timeout_s=240)  # no hang
            stopped_s = time.monotonic() - start
        finally:
            reap_group(driver.pid, wait_s=0)  # whatever happened, no search left running
        output = (workdir / "down.log").read_text()
        print(f"--- stopped {stopped_s:.0f} s after the server ---\n{output}")
        assert returncode == 2  # a gazetune error, reported in one line
        last = output.strip().splitlines()[-1]  # what the user reads last: the cause and the cure
        assert last.startswith("gazetune search: ") and server.uri in last, last
        assert "gazetune resume down" in last
        assert "Traceback" not in output and 'File "' not in output  # no traceback wall

        server.start()
        done = gazetune("resume", "down", cwd=workdir, check=False)
        print(done.stdout, done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{SAMPLES}/{SAMPLES} trials done" in done.stdout
        assert_study_complete(server, workdir, "down")
