"""Trials that fail in a real search: one that diverges, one that runs out of memory.

A diverged trial would diverge again, so it must fail at once, never become the best trial, and
leave the search to the others. Out of memory can be transient when trials share a GPU: the
trial is retried from its last checkpoint and fails, with a message saying what to change, only
when it keeps happening. The faults come from `helpers.faulty_trial`, a wrapper around
`search.trial.trial_fn` that Ray's workers receive by value (the `faults` fixture), as in
tests/test_resume.py: the first of two trials to start is the faulty one, and files count its
attempts across the processes Tune retries it in.
"""

import json

import pytest
import torch
from helpers import assert_complete_history, faulty_trial, quick_set, read_count, trial_runs
from optuna.trial import TrialState

from search.export import export
from search.reporting import BEST_CONFIGS
from search.searcher import load_study
from search.service import run_search
from search.settings import SearchSettings, parse_fixed
from trainable.config import TrialConfig
from trainable.errors import OutOfGpuMemory
from trainable.loop import train

DIVERGED = "training diverged at epoch 2, step 1: loss term(s) total=nan (injected)"


def two_trial_search(cache, workdir, name, max_failures):
    """The paper's two cheapest points side by side, 3 epochs each, none pruned."""
    settings = SearchSettings(name=name, cache=str(cache), samples=2, max_epochs=3,
                              grace_period=3, paper_points=True, max_failures=max_failures,
                              fixed=parse_fixed(quick_set(batch_size=16)))
    summary = run_search(settings, trainable=faulty_trial, workdir=workdir)
    runs = trial_runs(workdir, name)
    faulty = (workdir / "faults" / "faulty").read_text()
    [(other, other_steps)] = [runs[t] for t in runs if t != faulty]
    assert other.info.status == "FINISHED"  # the search went on with the other trial
    assert_complete_history(other_steps, 3)
    return summary, faulty, runs[faulty]


@pytest.mark.slow
def test_diverged_trial_fails_at_once_and_is_never_the_best(small_cache, tmp_path, faults):
    counters = faults("diverge", 1, epoch=2)
    summary, faulty, (run, steps) = two_trial_search(small_cache, tmp_path, "diverged",
                                                     max_failures=2)
    assert (summary.completed, summary.failed) == (1, 1)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == f"DivergedError: {DIVERGED}"
    assert_complete_history(steps, 1)
    # Tune started it three times (max_failures=2); only the first trained.
    assert (read_count(counters / "attempts"), read_count(counters / "trainings")) == (3, 1)

    assert summary.best["trial_id"] != faulty
    states = sorted(t.state.name for t in load_study(tmp_path / "ray_results" / "diverged").trials)
    assert states == [TrialState.COMPLETE.name, TrialState.FAIL.name]
    report = export("diverged", workdir=tmp_path)
    best = json.loads((report / BEST_CONFIGS).read_text())
    assert run.info.run_id not in {item["run_id"] for item in best}


# Under soak, for CI's time: a trial's exception retried from its checkpoint is CI's SIGKILL
# case in test_resume.py (the same retry), Tune's retries of an exception the diverged case
# above, and the out-of-memory line is checked without Ray below.
@pytest.mark.soak
def test_trial_out_of_memory_once_is_retried_from_its_checkpoint(small_cache, tmp_path, faults):
    counters = faults("oom", 1, epoch=2)
    summary, _, (run, steps) = two_trial_search(small_cache, tmp_path, "oom-once",
                                                max_failures=1)
    assert (summary.completed, summary.failed) == (2, 0)
    assert run.info.status == "FINISHED" and "failure" not in run.data.tags
    # Epoch 1 from the first attempt; 2 and 3 from the retry that resumed at its checkpoint.
    assert_complete_history(steps, 3)
    assert (read_count(counters / "faults"), read_count(counters / "trainings")) == (1, 2)


# Failing after every retry is max_failures' case in test_resume.py.
@pytest.mark.soak
def test_trial_out_of_memory_every_time_fails_with_what_to_change(small_cache, tmp_path,
                                                                  faults):
    counters = faults("oom", 2, epoch=2)
    summary, _, (run, steps) = two_trial_search(small_cache, tmp_path, "oom-always",
                                                max_failures=1)
    assert (summary.completed, summary.failed) == (1, 1)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == (
        "OutOfGpuMemory: out of memory on cpu training batch_size=16 at 64x64 px with "
        "gpu_memory_fraction=0 (no cap): use a smaller batch_size (--set batch_size=N)")
    assert_complete_history(steps, 1)
    assert read_count(counters / "faults") == 2


def test_out_of_memory_in_training_becomes_one_clear_line(small_cache, tmp_path, monkeypatch):
    def dataset_too_large_for_the_device(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # The first thing training puts on the device: the test needs no model built.
    monkeypatch.setattr("trainable.loop.DeviceData", dataset_too_large_for_the_device)
    config = {"cache": str(small_cache), "epochs": 1, "batch_size": 8, "threads": 2,
                  "checkpoint_dir": str(tmp_path / "ck"), "gpu_memory_fraction": 0.25}
    with pytest.raises(OutOfGpuMemory) as caught:
        train(config)
    assert str(caught.value) == (
        "out of memory on cpu training batch_size=8 at 64x64 px with gpu_memory_fraction=0.25: "
        "use a smaller batch_size (--set batch_size=N)")
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)  # the original, chained


@pytest.mark.gpu
def test_out_of_gpu_memory_names_the_share_and_the_peak(small_cache, tmp_path):
    config = TrialConfig.from_dict({
        "cache": str(small_cache), "epochs": 1, "batch_size": 8, "n_boot": 50, "figures": 0,
        "device": "cuda", "gpu_memory_fraction": 1e-4, "checkpoint_dir": str(tmp_path / "ck")})
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
