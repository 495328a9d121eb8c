"""Faults a long search survives: the driver killed outright, and a trial that crashes.

The faults come from outside the trainable: a SIGKILL to the `gazetune search` process, and a
wrapper around `search.trial.trial_fn`, given to the service as its `trainable`, that raises in
epoch 3 before reporting it, or SIGKILLs its own process there (its counter lives in files, so a retried trial sees earlier crashes).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle
from mlflow import MlflowClient
from conftest import gazetune
from optuna.trial import TrialState
from test_search import QUICK, assert_complete_history, trial_runs

from search import tracking
from search.searcher import load_study
from search.service import SearchSettings, parse_fixed, run_search

FAULTS_ENV = "GAZETUNE_TEST_FAULTS"  # "<folder for crash counters>:<crashes per trial>"


def crash_in_epoch_3(config, setup):
    """`trial_fn`, but epoch 3 raises instead of reporting, up to N times per trial."""
    from ray import tune

    from search.trial import trial_fn
    from trainable.loop import train as loop_train

    folder, crashes, *how = os.environ[FAULTS_ENV].split(":")
    counter = Path(folder) / tune.get_context().get_trial_id()

    def train(cfg, report, resume_from):
        def crash_or_report(epoch_report):
            done = len(counter.read_text()) if counter.exists() else 0
            if epoch_report.epoch == 3 and done < int(crashes):
                counter.write_text("x" * (done + 1))
                if how == ["sigkill"]:  # the trial's process dies without a word
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("injected fault in epoch 3")
            report(epoch_report)

        return loop_train(cfg, report=crash_or_report, resume_from=resume_from)

    trial_fn(config, setup, train=train)


@pytest.fixture
def faults(tmp_path, monkeypatch):
    """Set the crashes per trial; Ray's workers inherit the variable and unpickle the wrapper."""
    folder = tmp_path / "crashes"
    folder.mkdir()
    # Workers cannot import this test module: send the wrapper by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def set_crashes(n: int, how: str = "raise") -> Path:
        monkeypatch.setenv(FAULTS_ENV, f"{folder}:{n}:{how}")
        return folder

    yield set_crashes
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def one_trial_search(cache, tmp_path, name, max_failures):
    # The first paper point (baseline) makes the single trial cheap and known.
    settings = SearchSettings(name=name, cache=str(cache), samples=1, max_epochs=3,
                              grace_period=3, paper_points=True, max_failures=max_failures,
                              fixed=parse_fixed(QUICK))
    return run_search(settings, trainable=crash_in_epoch_3, workdir=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_crashed_trial_is_retried_from_its_checkpoint(small_cache, tmp_path, faults, how):
    counters = faults(1, how)
    summary = one_trial_search(small_cache, tmp_path, "retry", max_failures=1)
    assert (summary.completed, summary.pruned, summary.failed) == (1, 0, 0)
    [trial_id] = [p.name for p in counters.iterdir()]  # it did crash, once
    assert (counters / trial_id).read_text() == "x"
    [(run, steps)] = trial_runs(tmp_path, "retry").values()
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    # Epochs 1-2 from the first attempt, 3 from the retry that resumed at epoch 2's checkpoint.
    assert_complete_history(steps, 3)


@pytest.mark.slow
def test_trial_failing_beyond_max_failures_is_failed_with_its_reason(small_cache, tmp_path,
                                                                     faults):
    counters = faults(2)
    summary = one_trial_search(small_cache, tmp_path, "fail", max_failures=1)
    assert (summary.completed, summary.failed) == (0, 1)
    [(run, steps)] = trial_runs(tmp_path, "fail").values()
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "RuntimeError: injected fault in epoch 3"
    assert_complete_history(steps, 2)
    assert (counters / run.data.tags["ray.trial_id"]).read_text() == "xx"
    [trial] = load_study(tmp_path / "ray_results" / "fail").trials
    assert trial.state == TrialState.FAIL
    # No trial to report: the search's parent run ends FAILED instead of staying RUNNING.
    client = MlflowClient(tracking.resolve_tracking_uri(None, tmp_path))
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(small_cache, tmp_path):
    n = 4
    driver = subprocess.Popen(
        [sys.executable, "-m", "search", "search", "--name", "killed", "--cache",
         str(small_cache), "--samples", str(n), "--max-epochs", "3", "--grace-period", "1",
         "--max-concurrent", "2", "--set", *QUICK],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )
    try:
        # Kill once a trial has ended and the next one has started, the other still running.
        ended, output = 0, []
        for line in driver.stdout:
            output.append(line)
            if re.search(r"trial \w+ (finished|pruned)", line):
                ended += 1
            elif ended and " started: " in line:
                break
        else:
            pytest.fail("the search ended before it could be killed:\n" + "".join(output))
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        _reap(driver.pid)

    done = gazetune("resume", "killed", cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    print("".join(output), "--- killed ---\n", done.stdout)
    assert f"{n}/{n} trials done" in done.stdout

    runs = trial_runs(tmp_path, "killed")
    assert len(runs) == n  # exactly one run per trial: none lost, none doubled
    for run, steps in runs.values():
        assert run.info.status == "FINISHED"
        epochs = max(steps["train/loss"])
        assert_complete_history(steps, epochs)
        assert (run.data.tags.get("pruned") == "true") == (epochs < 3)
    trials = load_study(tmp_path / "ray_results" / "killed").trials
    assert len(trials) == n
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}


def _reap(pgid: int, wait_s: float = 60.0) -> None:
    """Wait for the killed driver's local Ray processes to go (they share its fate), then make
    sure: leftover workers must not write to the study while it resumes."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
