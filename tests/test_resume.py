"""Faults a long search survives: the driver killed outright, and a trial that crashes.

The faults come from outside the trainable: a SIGKILL to the `gazetune search` process, and
`helpers.faulty_trial`, a wrapper around `search.trial.trial_fn` given to the service as its
`trainable` (set up by the `faults` fixture), that raises in epoch 3 before reporting it, or
SIGKILLs its own process there (its counters live in files, so a retried trial sees earlier
crashes).
"""

import os
import re
import signal
import subprocess
import sys

import pytest
from helpers import (
    assert_complete_history,
    faulty_trial,
    gazetune,
    quick_set,
    read_count,
    reap_group,
    trial_runs,
)
from mlflow import MlflowClient
from optuna.trial import TrialState

from search import tracking
from search.searcher import load_study
from search.service import run_search
from search.settings import SearchSettings, parse_fixed


def one_trial_search(cache, tmp_path, name, max_failures):
    # The first paper point (baseline) makes the single trial cheap and known.
    settings = SearchSettings(name=name, cache=str(cache), samples=1, max_epochs=3,
                              grace_period=3, paper_points=True, max_failures=max_failures,
                              fixed=parse_fixed(quick_set(batch_size=16)))
    return run_search(settings, trainable=faulty_trial, workdir=tmp_path)


# One case in CI (the harder one: the trial's process dies); an exception raised in the trial
# takes the same retry path, under `pytest -m soak`.
@pytest.mark.parametrize("how", [pytest.param("raise", marks=pytest.mark.soak),
                                 pytest.param("sigkill", marks=pytest.mark.slow)])
def test_crashed_trial_is_retried_from_its_checkpoint(small_cache, tmp_path, faults, how):
    counters = faults(how, 1, epoch=3)
    summary = one_trial_search(small_cache, tmp_path, "retry", max_failures=1)
    assert (summary.completed, summary.pruned, summary.failed) == (1, 0, 0)
    assert read_count(counters / "faults") == 1  # it did crash, once
    [(run, steps)] = trial_runs(tmp_path, "retry").values()
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    # Epochs 1-2 from the first attempt, 3 from the retry that resumed at epoch 2's checkpoint.
    assert_complete_history(steps, 3)


@pytest.mark.slow
def test_trial_failing_beyond_max_failures_is_failed_with_its_reason(small_cache, tmp_path,
                                                                     faults):
    counters = faults("raise", 2, epoch=3)
    summary = one_trial_search(small_cache, tmp_path, "fail", max_failures=1)
    assert (summary.completed, summary.failed) == (0, 1)
    [(run, steps)] = trial_runs(tmp_path, "fail").values()
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "RuntimeError: injected fault in epoch 3"
    assert_complete_history(steps, 2)
    assert (counters / "faulty").read_text() == run.data.tags["ray.trial_id"]
    assert read_count(counters / "faults") == 2
    [trial] = load_study(tmp_path / "ray_results" / "fail").trials
    assert trial.state == TrialState.FAIL
    # No trial to report: the search's parent run ends FAILED instead of staying RUNNING.
    client = MlflowClient(tracking.resolve_tracking_uri(None, tmp_path))
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


# A repeat of the driver-kill scenario (here: two trials at once, killed between trials): CI
# runs its seeded case in test_kill.py; this one is for a person (`pytest -m soak`).
@pytest.mark.soak
def test_resume_after_the_driver_is_killed(small_cache, tmp_path):
    n = 4
    driver = subprocess.Popen(
        [sys.executable, "-m", "search", "search", "--name", "killed", "--cache",
         str(small_cache), "--samples", str(n), "--max-epochs", "3", "--grace-period", "1",
         "--max-concurrent", "2", "--set", *quick_set(batch_size=16)],
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
        reap_group(driver.pid)

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

