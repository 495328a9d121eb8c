"""Small or unbalanced data: refused in one line before any training, never a traceback."""

from __future__ import annotations

import pytest
from helpers import gazetune

from synthetic.release import synthesize
from trainable.data.cache import prepare

# 40 images, seed 1: the patient split leaves the validation split without a Normal image.
IMAGES, SEED = 40, 1


@pytest.fixture(scope="module")
def unbalanced_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    synthesize(root / "data", n_images=IMAGES, seed=SEED, verbose=False)
    summary = prepare(egd_root=root / "data" / "egd-cxr", mimic_root=root / "data" / "mimic-cxr",
                      cache=root / "cache", size=32, workers=1, sigma=20.0)
    assert summary.counts["val"]["Normal"] == 0 and summary.counts["val"]["CHF"] > 0
    return root / "cache"


def one_line_refusal(done, command: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gazetune {command}: "), done.stderr
    return lines[0]


def test_a_search_whose_validation_split_lacks_a_class_is_refused_before_ray(
        unbalanced_cache, tmp_path):
    done = gazetune("search", "--name", "small", "--cache", str(unbalanced_cache),
                    "--samples", "2", "--max-epochs", "2", cwd=tmp_path, check=False)
    line = one_line_refusal(done, "search")
    assert "the validation split has no Normal image" in line
    assert "prepare more images" in line
    assert list(tmp_path.iterdir()) == []  # no Tune state, no MLflow store, no run


def test_one_training_with_that_cache_is_refused_before_mlflow(unbalanced_cache, tmp_path):
    done = gazetune("train", f"cache={unbalanced_cache}", "epochs=1", cwd=tmp_path, check=False)
    assert "the validation split has no Normal image" in one_line_refusal(done, "train")
    assert list(tmp_path.iterdir()) == []


def test_selection_skips_a_trial_whose_score_is_never_defined():
    """A validation AUC that is NaN at every epoch: no best trial, no pandas traceback."""
    import math

    import pandas as pd

    from search.service import _peak

    class Result:
        metrics_dataframe = pd.DataFrame({"val/auc/mean": [math.nan, math.nan],
                                          "training_iteration": [1, 2]})

    assert _peak(Result(), "val/auc/mean") == -math.inf
