"""Trials that fail in a real search: one that diverges, one that runs out of memory.

A diverged trial would diverge again, so it must fail at once, never become the best trial, and
leave the search to the others. Out of memory can be transient when trials share a GPU: the
trial is retried from its last checkpoint and fails, with a message saying what to change, only
when it keeps happening. The faults come from a wrapper around `search.trial.trial_fn` that
Ray's workers receive by value, as in tests/test_resume.py: the first of two trials to start is
the faulty one, and files count its attempts across the processes Tune retries it in.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from optuna.trial import TrialState
from test_search import QUICK, assert_complete_history, trial_runs

from search.export import BEST_CONFIGS, export
from search.searcher import load_study
from search.service import SearchSettings, parse_fixed, run_search
from trainable.config import TrialConfig
from trainable.errors import DivergedError, OutOfGpuMemory
from trainable.loop import METRIC, train

FAULTS_ENV = "GAZETUNE_TEST_TRIAL_FAULTS"  # "<folder for counters>:<diverge|oom>:<times>"
DIVERGED = "training diverged at epoch 2, step 1: loss term(s) total=nan (injected)"


def faulty_trial(config, setup):
    """`trial_fn`, but the first trial to start diverges or runs out of memory in epoch 2."""
    from ray import tune

    from search.trial import trial_fn
    from trainable.loop import train as loop_train

    folder, fault, times = os.environ[FAULTS_ENV].split(":")
    folder = Path(folder)
    trial_id = tune.get_context().get_trial_id()
    if _claim(folder / "faulty", trial_id) != trial_id:
        return trial_fn(config, setup)
    _count(folder / "attempts")  # every start, retries included

    def train(cfg, report, resume_from):
        _count(folder / "trainings")

        def faulty_report(epoch_report):
            if fault == "diverge" and epoch_report.epoch == 1:
                # A perfect first epoch: only its failure can keep it from being the best.
                metrics = {**epoch_report.metrics, METRIC: 1.0}
                epoch_report = dataclasses.replace(epoch_report, metrics=metrics)
            elif epoch_report.epoch == 2 and _read(folder / "faults") < int(times):
                _count(folder / "faults")
                if fault == "diverge":
                    raise DivergedError(DIVERGED)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                             "(injected)")
            report(epoch_report)

        return loop_train(cfg, report=faulty_report, resume_from=resume_from)

    trial_fn(config, setup, train=train)


def _claim(path: Path, trial_id: str) -> str:
    """The trial id written in `path` by the first trial to create it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return path.read_text()
    with os.fdopen(fd, "w") as out:
        out.write(trial_id)
    return trial_id


def _read(counter: Path) -> int:
    return len(counter.read_text()) if counter.exists() else 0


def _count(counter: Path) -> None:
    counter.write_text("x" * (_read(counter) + 1))  # one process of the faulty trial at a time


@pytest.fixture
def faults(tmp_path, monkeypatch):
    """Choose the fault and how often it happens; Ray's workers inherit the variable."""
    folder = tmp_path / "faults"
    folder.mkdir()
    # Workers cannot import this test module: send the wrapper by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def set_fault(fault: str, times: int) -> Path:
        monkeypatch.setenv(FAULTS_ENV, f"{folder}:{fault}:{times}")
        return folder

    yield set_fault
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def two_trial_search(cache, workdir, name, max_failures):
    """The paper's two cheapest points side by side, 3 epochs each, none pruned."""
    settings = SearchSettings(name=name, cache=str(cache), samples=2, max_epochs=3,
                              grace_period=3, paper_points=True, max_failures=max_failures,
                              fixed=parse_fixed(QUICK))
    summary = run_search(settings, trainable=faulty_trial, workdir=workdir)
    runs = trial_runs(workdir, name)
    faulty = (workdir / "faults" / "faulty").read_text()
    [(other, other_steps)] = [runs[t] for t in runs if t != faulty]
    assert other.info.status == "FINISHED"  # the search went on with the other trial
    assert_complete_history(other_steps, 3)
    return summary, faulty, runs[faulty]


@pytest.mark.slow
def test_diverged_trial_fails_at_once_and_is_never_the_best(small_cache, tmp_path, faults):
    counters = faults("diverge", 1)
    summary, faulty, (run, steps) = two_trial_search(small_cache, tmp_path, "diverged",
                                                     max_failures=2)
    assert (summary.completed, summary.failed) == (1, 1)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == f"DivergedError: {DIVERGED}"
    assert_complete_history(steps, 1)
    # Tune started it three times (max_failures=2); only the first trained.
    assert (_read(counters / "attempts"), _read(counters / "trainings")) == (3, 1)

    assert summary.best["trial_id"] != faulty
    states = sorted(t.state.name for t in load_study(tmp_path / "ray_results" / "diverged").trials)
    assert states == [TrialState.COMPLETE.name, TrialState.FAIL.name]
    report = export("diverged", workdir=tmp_path)
    best = json.loads((report / BEST_CONFIGS).read_text())
    assert run.info.run_id not in {item["run_id"] for item in best}


@pytest.mark.slow
def test_trial_out_of_memory_once_is_retried_from_its_checkpoint(small_cache, tmp_path, faults):
    counters = faults("oom", 1)
    summary, _, (run, steps) = two_trial_search(small_cache, tmp_path, "oom-once",
                                                max_failures=1)
    assert (summary.completed, summary.failed) == (2, 0)
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    # Epoch 1 from the first attempt; 2 and 3 from the retry that resumed at its checkpoint.
    assert_complete_history(steps, 3)
    assert (_read(counters / "faults"), _read(counters / "trainings")) == (1, 2)


@pytest.mark.slow
def test_trial_out_of_memory_every_time_fails_with_what_to_change(small_cache, tmp_path,
                                                                  faults):
    counters = faults("oom", 2)
    summary, _, (run, steps) = two_trial_search(small_cache, tmp_path, "oom-always",
                                                max_failures=1)
    assert (summary.completed, summary.failed) == (1, 1)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == (
        "OutOfGpuMemory: out of memory on cpu training batch_size=16 at 64x64 px with "
        "gpu_memory_fraction=0 (no cap): use a smaller batch_size (--set batch_size=N)")
    assert_complete_history(steps, 1)
    assert _read(counters / "faults") == 2


def test_out_of_memory_in_training_becomes_one_clear_line(small_cache, tmp_path, monkeypatch):
    def dataset_too_large_for_the_device(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # The first thing training puts on the device: the test needs no model built.
    monkeypatch.setattr("trainable.loop.DeviceData", dataset_too_large_for_the_device)
    config = dict(cache=str(small_cache), epochs=1, batch_size=8, threads=2,
                  checkpoint_dir=str(tmp_path / "ck"), gpu_memory_fraction=0.25)
    with pytest.raises(OutOfGpuMemory) as caught:
        train(config)
    assert str(caught.value) == (
        "out of memory on cpu training batch_size=8 at 64x64 px with gpu_memory_fraction=0.25: "
        "use a smaller batch_size (--set batch_size=N)")
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)  # the original, chained


@pytest.mark.gpu
def test_out_of_gpu_memory_names_the_share_and_the_peak(small_cache, tmp_path):
    config = TrialConfig.from_dict(dict(
        cache=str(small_cache), epochs=1, batch_size=8, n_boot=50, figures=0, device="cuda",
        gpu_memory_fraction=1e-4, checkpoint_dir=str(tmp_path / "ck")))
    try:
        with pytest.raises(OutOfGpuMemory) as caught:  # a real OOM: the model does not fit
            train(config)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)  # the cap is process-wide
    message = str(caught.value)
    assert message.startswith("out of memory on cuda")
    assert "batch_size=8 at 64x64 px with gpu_memory_fraction=0.0001 (" in message
    assert ", peak allocated " in message and "--gpus-per-trial" in message
    assert "\n" not in message
