"""Shared fixtures: a small synthetic cache built once per session, a real MLflow server, faults
injected into a search's trials. Shared plain functions and constants are in helpers.py."""

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

# Keep the two cores of CI for the tests themselves.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Fixture modules that live beside this file (tests/ is on sys.path under pytest's prepend mode).
pytest_plugins = [m for m in ("mlflow_server",) if importlib.util.find_spec(m)]

HAS_CUDA = False
try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_in_basetemp(tmp_path_factory):
    """Temporary folders the code under test makes in this process (a trial without a checkpoint
    folder of its own) go to pytest's folder, which pytest empties after tests that pass
    (`tmp_path_retention_policy`), not to /tmp, which nobody empties: CI's disk is small."""
    tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
    yield
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A 60-image synthetic release (EGD-CXR + MIMIC-CXR layout)."""
    from synthetic.release import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n_images=60, seed=0)
    return out


@pytest.fixture(scope="session")
def small_cache(small_dataset, tmp_path_factory) -> Path:
    """The 60-image synthetic set prepared at 64 px: a cache folder for `train` and `search`."""
    from trainable.data.cache import prepare

    cache = tmp_path_factory.mktemp("cache")
    prepare(egd_root=small_dataset / "egd-cxr", mimic_root=small_dataset / "mimic-cxr",
            cache=cache, size=64, workers=1, sigma=20.0)
    return cache


@pytest.fixture(scope="session")
def cache90(tmp_path_factory) -> Path:
    """90 synthetic images at 64 px: a test split of 10 with every class (3 / 5 / 2), for test
    AUCs (the 60-image cache's test split has no pneumonia)."""
    from synthetic.release import synthesize
    from trainable.data.cache import prepare

    root = tmp_path_factory.mktemp("cache90")
    synthesize(root / "release", n_images=90, seed=0, verbose=False)
    prepare(egd_root=root / "release" / "egd-cxr", mimic_root=root / "release" / "mimic-cxr",
            cache=root / "cache", size=64, workers=1, sigma=20.0)
    return root / "cache"


@pytest.fixture
def faults(tmp_path, monkeypatch):
    """Faults for the trials of a search run with `helpers.faulty_trial` as its trainable:
    `faults(fault, times, epoch)` chooses the fault, how often it happens and in which epoch,
    and returns the folder of its counters. Ray's workers inherit the variable."""
    import helpers  # here: importing it loads torch, after OMP_NUM_THREADS is set above
    import ray.cloudpickle

    folder = tmp_path / "faults"
    folder.mkdir()
    # Workers cannot import the tests' modules: send the wrapper by value.
    ray.cloudpickle.register_pickle_by_value(helpers)

    def set_fault(fault: str, times: int, epoch: int) -> Path:
        monkeypatch.setenv(helpers.FAULTS_ENV, f"{folder}:{fault}:{times}:{epoch}")
        return folder

    yield set_fault
    ray.cloudpickle.unregister_pickle_by_value(helpers)


# Property tests draw the same examples on every run, so CI cannot fail on a new random draw.
try:
    from hypothesis import settings

    settings.register_profile("gazetune", derandomize=True, deadline=None)
    settings.load_profile("gazetune")
except ImportError:
    pass
