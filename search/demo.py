"""`gazetune demo`: the whole service on synthetic data, in about 12 minutes on a 2-core CPU.

Synthetic release -> cache -> a small search (the paper's eight configurations, each to the
full budget, two trials at a time; `--trials` above eight adds TPE's trials under ASHA) ->
report -> test evaluation of the best trial and the test table of every configuration, all on
the embedded defaults under one working directory:

    data/          the synthetic EGD-CXR + MIMIC-CXR release
    cache/         the prepared cache
    mlflow.db      MLflow's store, artifacts in mlartifacts/
    ray_results/   Tune's state of the search
    reports/demo/  the report
"""

from __future__ import annotations

import time
from pathlib import Path

from trainable.errors import GazetuneError

NAME = "demo"
IMAGES = 400  # 317/41/42 after the patient split
SIZE = 64
# Findings drawn twice as strong (pneumonias twice as wide) as in the default synthetic
# release, a teaching set: at 64 px and four CPU epochs the default's faint opacities leave the
# classifier at validation AUC ~0.8, pneumonia ~0.7.
SUBTLETY = -1.0
# The synthetic images are a few hundred pixels high: the reference's 150-pixel blur (for
# ~3000-pixel radiographs) would spread each fixation over half the image.
SIGMA = 20.0
# The paper's eight configurations, each to the full budget, so that the test table compares
# them all (`--trials N` adds N - 8 sampled by TPE, which ASHA judges).
TRIALS = 8
EPOCHS = 4
# 500 resamples keep each validation pass short; the test evaluation uses the full 2,000.
TRIAL_SETTINGS = {"batch_size": 16, "n_boot": 500, "figures": 1}


def run_demo(workdir: str | Path | None = None, images: int = IMAGES, trials: int = TRIALS,
             epochs: int = EPOCHS, size: int = SIZE, seed: int = 0) -> Path:
    """Run the demo in `workdir` (default: the current directory); returns the report folder.

    Raises:
        GazetuneError: `workdir` already holds a demo search or report.
    """
    from search.configurations import evaluate_configurations
    from search.evaluate import evaluate_study
    from search.export import export
    from search.service import run_search
    from search.settings import SearchSettings
    from search.tracking import resolve_tracking_uri
    from spaces import PAPER_POINTS
    from synthetic.release import synthesize
    from trainable.data.cache import prepare

    for option, value, low in (("--images", images, 100), ("--trials", trials, 1),
                               ("--epochs", epochs, 1)):
        if not low <= value <= 100_000:  # before anything is written
            raise GazetuneError(f"demo: {option} must be in [{low}, 100000], got {value}")
    workdir = Path(workdir or Path.cwd()).absolute()
    for earlier in (workdir / "ray_results" / NAME, workdir / "reports" / NAME):
        if earlier.exists():
            raise GazetuneError(f"{earlier} exists: the demo has run in {workdir} already; "
                                f"use another --workdir (or delete that folder and mlflow.db)")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    _step(1, f"a synthetic release of {images} images in {workdir / 'data'}")
    synthesize(workdir / "data", n_images=images, seed=seed, subtlety=SUBTLETY)
    _step(2, f"prepare the cache at {size} px")
    prepare(egd_root=workdir / "data" / "egd-cxr", mimic_root=workdir / "data" / "mimic-cxr",
            cache=workdir / "cache", size=size, sigma=SIGMA)
    sampled = max(0, trials - len(PAPER_POINTS))
    _step(3, f"search: {min(trials, len(PAPER_POINTS))} of the paper's configurations, "
             f"{epochs} epochs each"
             + (f", then {sampled} sampled by TPE, up to {epochs} epochs under ASHA"
                if sampled else "") + "; 2 at a time")
    run_search(SearchSettings(name=NAME, samples=trials, max_epochs=epochs, grace_period=1,
                              cpus_per_trial=1, max_concurrent=2, paper_points=True, seed=seed,
                              fixed=dict(TRIAL_SETTINGS)),
               workdir=workdir)
    _step(4, "export the report")
    report = export(NAME, workdir=workdir)
    _step(5, "evaluate on the test split: the best trial, then the best of each configuration")
    evaluate_study(NAME, workdir=workdir)
    evaluate_configurations(NAME, workdir=workdir)

    db = resolve_tracking_uri(None, workdir)
    print(f"\ndemo finished in {(time.monotonic() - started) / 60:.1f} min\n"
          f"  report:  {report / 'summary.md'}\n"
          f"           {report / 'evaluation.md'}\n"
          f"           {report / 'configurations.md'}\n"
          f"  MLflow:  mlflow ui --backend-store-uri {db} --host 127.0.0.1\n"
          f"           then open http://127.0.0.1:5000 (experiment {NAME!r})", flush=True)
    return report


def _step(number: int, what: str) -> None:
    print(f"\n== demo {number}/5: {what}", flush=True)
