"""SIGKILL at random points: `gazetune search` (then `gazetune resume`) and `gazetune export`.

Every kill point is drawn from a seeded `random.Random`, printed with its seed
so that a failure can be replayed. The search is small and deterministic (one trial at a time,
a fixed sampler seed, one torch thread per trial), so a killed and resumed search must export
the same report as an uninterrupted one: same trials, same configurations, same validation AUCs.
The uninterrupted search is run once per module and also serves the export cases.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import assert_complete_history, gazetune, quick_set, reap_group, trial_runs
from mlflow import MlflowClient
from optuna.trial import TrialState
from ray.tune import ExperimentAnalysis

from search import tracking
from search.reporting import BEST_CONFIGS
from search.searcher import load_study
from trainable.files import remove_stale_temporaries

NAME = "det"
SAMPLES, EPOCHS = 3, 3
# Early stopping on (ASHA's rungs at epochs 1 and 2): the resumed search must stop the same
# trials at the same rungs as the uninterrupted one, which needs ASHA's state restored with
# Tune's (`search.scheduler`). One trial at a time and a seeded sampler make it deterministic.
SEARCH = ["--name", NAME, "--samples", str(SAMPLES), "--max-epochs", str(EPOCHS),
          "--grace-period", "1", "--max-concurrent", "1", "--seed", "3",
          "--set", *quick_set(batch_size=16)]
# Seconds after the first "trial ... started" line: the first trial's process start, its three
# epochs and their checkpoints (it ends about 35-45 s after that line on a 2-core CPU, measured).
KILL_WINDOW_S = (1.0, 40.0)
# Seconds after the third trial's "started" line: before its first epoch ends (15-20 s), which
# ASHA judges against the rungs the first two trials filled (the uninterrupted search stops it
# there). Without ASHA's state restored, the resumed rungs would be empty and it would run on.
LAST_TRIAL_WINDOW_S = (2.0, 8.0)
EXPORT_KILL_SEED = 2024
EXPORT_KILLS = 4


class Driver:
    """A `gazetune` subprocess in its own process group, its output read as it comes."""

    def __init__(self, args: list[str], cwd: Path):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "search", *args], cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True)
        self._starts = threading.Semaphore(0)  # one release per "trial ... started" line
        # Drained by a thread: the driver must never block on a full pipe while the test waits.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if " started: " in line:
                self._starts.release()

    def wait_for_trial_start(self, k: int, timeout_s: float = 300.0) -> None:
        """Until the k-th trial (1-based) has started."""
        for i in range(k):
            if not self._starts.acquire(timeout=timeout_s):
                pytest.fail(f"trial {i + 1} did not start:\n" + self.output)

    def kill(self) -> None:
        """SIGKILL the driver alone (its Ray processes share its fate), then reap the group."""
        start = time.monotonic()
        try:
            if self.proc.poll() is None:  # else it ended by itself and was reaped
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        finally:
            # Measured: the raylet and the trial's worker go within 2 s of the driver; Ray's
            # dashboard and runtime-env agents stay until killed, so waiting longer gains nothing.
            reap_group(self.proc.pid, wait_s=10)
        self.reaped_s = time.monotonic() - start

    @property
    def output(self) -> str:
        return "".join(self.lines)


def temporaries(folder: Path) -> list[Path]:
    """Files written under a temporary name (`.NAME.*.tmp`) and never moved into place."""
    return list(folder.rglob(".*.tmp"))


def progress(workdir: Path) -> str:
    """How far the trials had got: epochs in their MLflow runs, checkpoints in Tune's storage."""
    epochs = {trial: max(steps.get("train/loss", [0]))
              for trial, (_, steps) in trial_runs(workdir, NAME).items()}
    checkpoints = {folder.name.split("_")[2]: len(list(folder.glob("checkpoint_*")))
                   for folder in (workdir / "ray_results" / NAME).glob("trial_fn_*")}
    return f"epochs logged {epochs}, checkpoints saved {checkpoints}"


def files(folder: Path) -> dict[str, bytes]:
    """{relative path: content} of the files under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_study_complete(workdir: Path) -> None:
    """Each trial once, in Tune, Optuna and MLflow; every run FINISHED with its whole history."""
    runs = trial_runs(workdir, NAME)
    assert len(runs) == SAMPLES  # exactly one run per trial: none lost, none doubled
    for run, steps in runs.values():
        assert run.info.status == "FINISHED", run.data.tags.get("failure")
        epochs = max(steps["train/loss"])
        assert_complete_history(steps, epochs)
        assert (run.data.tags.get("pruned") == "true") == (epochs < EPOCHS)
    experiment = workdir / "ray_results" / NAME
    assert len(ExperimentAnalysis(str(experiment)).trials) == SAMPLES
    trials = load_study(experiment).trials
    assert len(trials) == SAMPLES
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert temporaries(workdir) == []


def trial_histories(workdir: Path) -> list:
    """[(params, training losses by epoch)] of the study's trials in order of start; the
    trial's scratch folder left out of its params."""
    uri = tracking.resolve_tracking_uri(None, workdir)
    client = MlflowClient(uri)
    return [({k: v for k, v in run.data.params.items() if k != "checkpoint_dir"},
             [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                      key=lambda m: m.step)])
            for run in tracking.find_trial_runs(uri, NAME)]


def exported(workdir: Path) -> list[dict]:
    done = gazetune("export", NAME, cwd=workdir, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((workdir / "reports" / NAME / BEST_CONFIGS).read_text())


@pytest.fixture(scope="module")
def uninterrupted(small_cache, tmp_path_factory) -> Path:
    """The search run once without a fault, and exported: its working directory."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    start = time.monotonic()
    done = gazetune("search", "--cache", str(small_cache), *SEARCH, cwd=workdir, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"uninterrupted search: {time.monotonic() - start:.0f} s\n{done.stdout}")
    assert_study_complete(workdir)
    pruned = [run for run, _ in trial_runs(workdir, NAME).values()
              if run.data.tags.get("pruned") == "true"]
    # The CI kill lands in the third trial, which ASHA must stop at its first rung.
    assert [run.data.tags["trial_number"] for run in pruned] == ["2"], \
        "ASHA stopped another trial than the third: the CI kill would not exercise its rungs"
    exported(workdir)
    return workdir


# CI kills once, a few seconds into the third trial, after the first two have filled ASHA's
# rungs and before the third is judged against them (measured: with ASHA's state not restored,
# this kill lets the third trial run its whole budget). The other kills are repeats a person
# runs (`pytest -m soak`), at random points of the first trial.
@pytest.mark.parametrize("after_trial, seed", [
    pytest.param(3, 6, marks=pytest.mark.slow),
    pytest.param(1, 1, marks=pytest.mark.soak),
    pytest.param(1, 5, marks=pytest.mark.soak),
    pytest.param(1, 2, marks=pytest.mark.soak)])
def test_search_killed_at_a_random_point_resumes_to_the_uninterrupted_result(
        after_trial, seed, small_cache, uninterrupted, tmp_path):
    window = KILL_WINDOW_S if after_trial == 1 else LAST_TRIAL_WINDOW_S
    delay = random.Random(seed).uniform(*window)
    print(f"kill seed {seed}: SIGKILL {delay:.2f} s after trial {after_trial} started")
    driver = Driver(["search", "--cache", str(small_cache), *SEARCH], cwd=tmp_path)
    try:
        driver.wait_for_trial_start(after_trial)
        time.sleep(delay)
        assert driver.proc.poll() is None, "the search ended before the kill:\n" + driver.output
    finally:
        driver.kill()
    print(f"at the kill: {progress(tmp_path)}; reaped in {driver.reaped_s:.0f} s")

    done = gazetune("resume", NAME, cwd=tmp_path, check=False)
    print(driver.output, "--- killed ---\n", done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{SAMPLES}/{SAMPLES} trials done" in done.stdout
    assert_study_complete(tmp_path)

    # Deterministic search: each trial's params and training losses equal the uninterrupted
    # search's (losses are finer than the AUCs of 6 validation images), and so does the report.
    resumed, reference = trial_histories(tmp_path), trial_histories(uninterrupted)
    assert [params for params, _ in resumed] == [params for params, _ in reference]
    for (_, losses), (_, expected) in zip(resumed, reference):
        assert losses == pytest.approx(expected, abs=1e-6)
    report = exported(tmp_path)
    expected = json.loads((uninterrupted / "reports" / NAME / BEST_CONFIGS).read_text())
    assert [t["config"] for t in report] == [t["config"] for t in expected]
    for got, want in zip(report, expected):
        for name, interval in want["val"].items():
            assert got["val"][name] == pytest.approx(interval, abs=1e-6), name


@pytest.mark.slow
def test_export_killed_at_random_points_then_rerun_writes_the_same_report(uninterrupted):
    reference = files(uninterrupted / "reports" / NAME)
    reports = uninterrupted / "killed-reports"
    out = reports / NAME
    rng = random.Random(EXPORT_KILL_SEED)
    for attempt in range(EXPORT_KILLS):
        # Kill when the k-th file (a temporary or a final name) appears: the writes take a
        # fraction of the export's seconds, which a random delay would mostly miss.
        k = rng.randint(1, 2 * len(reference))
        seen = _kill_at_kth_file(["export", NAME, "--reports", str(reports)], uninterrupted,
                                 out, k)
        print(f"export kill seed {EXPORT_KILL_SEED}, attempt {attempt}: file {k}; killed "
              f"after {seen}; left {sorted(p.name for p in temporaries(out))}")
        for path, content in files(out).items():  # whatever has a final name is whole
            if not Path(path).name.endswith(".tmp"):
                assert content == reference[path], f"attempt {attempt}: {path} half-written"

    done = gazetune("export", NAME, "--reports", str(reports), cwd=uninterrupted, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert temporaries(out) == []
    assert files(out) == reference


def _kill_at_kth_file(args: list[str], cwd: Path, out: Path, k: int) -> list[str]:
    """Run `gazetune ARGS`, SIGKILL it once `k` new names have appeared under `out`; the names
    seen, in order (fewer than k: it finished first)."""
    before = _inodes(out)
    driver = Driver(args, cwd=cwd)
    seen: list[tuple[str, int]] = []
    try:
        while driver.proc.poll() is None and len(seen) < k:
            # A file replaced in place has a new inode (`os.replace`): it counts as new.
            seen += sorted(_inodes(out) - before - set(seen))
            time.sleep(0.001)
    finally:
        driver.kill()
    return [name for name, _ in seen]


def _inodes(folder: Path) -> set[tuple[str, int]]:
    out = set()
    for p in folder.rglob("*") if folder.exists() else ():
        try:
            out.add((p.name, p.stat().st_ino))
        except FileNotFoundError:  # a temporary name moved into place meanwhile
            pass
    return out


def test_a_rerun_removes_temporaries_of_dead_writers_only(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / "figures" / f".importance.png.{dead.pid}.0a1b.tmp"
    live = tmp_path / f".summary.md.{os.getpid()}.2c3d.tmp"
    other = tmp_path / ".notes.tmp"  # not one of ours: no writer's pid in its name
    elsewhere = tmp_path / "user" / orphan.name  # a folder the writer was not given
    for path in (orphan, live, other, elsewhere):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    remove_stale_temporaries(tmp_path, tmp_path / "figures")
    assert not orphan.exists()
    assert live.exists() and other.exists() and elsewhere.exists()
