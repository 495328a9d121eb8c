"""Shared fixtures: a small synthetic cache built once per session, a real MLflow server."""

import importlib.util
import os
import subprocess
import sys
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


def gazetune(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "search", *args],
        cwd=cwd, capture_output=True, text=True, check=check,
    )


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A 60-image synthetic release (EGD-CXR + MIMIC-CXR layout)."""
    from trainable.data.synthetic import synthesize

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


# Property tests draw the same examples on every run, so CI cannot fail on a new random draw.
try:
    from hypothesis import settings

    settings.register_profile("gazetune", derandomize=True, deadline=None)
    settings.load_profile("gazetune")
except ImportError:
    pass
