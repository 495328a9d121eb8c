"""`gazetune export NAME --register MODEL`: the study's best checkpoint in the Model Registry.

The best trial's checkpoint becomes an MLflow Model of its run (`search.tracking.log_model`,
logged from code by `search/mlflow_model.py`), once: a later export finds it and only registers
it. `mlflow.pyfunc.load_model("models:/MODEL/VERSION").predict(images)` then takes float32
images [N, S, S] in [0, 1] at the trial's image size and returns the class probabilities.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from search import tracking
from search.names import check_name
from trainable.errors import GazetuneError


def check_model_name(name: str) -> str:
    """`name` if it can name a registered model here (the study-name rule); otherwise a
    one-line `ConfigError`."""
    return check_name(name, "--register", names="a registered model")


@dataclass(frozen=True)
class Registered:
    """Where the best checkpoint went: its logged model and its registered version."""

    run_id: str
    model_uri: str  # models:/<model_id>, the logged model of the trial's run
    name: str
    version: str
    logged: bool  # False when the run already had its model (an earlier export logged it)

    @property
    def uri(self) -> str:
        """`models:/NAME/VERSION`, what `mlflow.pyfunc.load_model` and `gazetune predict` take."""
        return f"models:/{self.name}/{self.version}"


def register_best(tracking_uri: str, run_id: str, name: str,
                  epoch: int | None = None) -> Registered:
    """Log trial run `run_id`'s best checkpoint as an MLflow Model (unless it has one) and
    register it as a version of `name`.

    Raises:
        GazetuneError: the run has no checkpoint, or its checkpoint does not load as the model
            of its config, or its image size is unknown; one line naming the run.
    """
    check_model_name(name)
    model_uri = tracking.logged_model_uri(tracking_uri, run_id)
    logged = model_uri is None
    if logged:
        with tempfile.TemporaryDirectory(prefix="gazetune-register-") as scratch:
            folder, size = _checkpoint_for_model(tracking_uri, run_id, Path(scratch))
            model_uri = tracking.log_model(tracking_uri, run_id, folder, size, step=epoch or 0)
    version = tracking.register_model(tracking_uri, model_uri, name, run_id=run_id)
    return Registered(run_id, model_uri, name, version, logged)


def _checkpoint_for_model(tracking_uri: str, run_id: str, scratch: Path) -> tuple[Path, int]:
    """The run's `checkpoint/` artifact, downloaded, and its image size (a checkpoint from
    before training recorded it gets its cache's), checked to load as a model."""
    from trainable.data.cache import prepared_size
    from trainable.inference import Classifier

    try:
        folder = Path(tracking.download_artifact(tracking_uri, run_id, "checkpoint", scratch))
    except GazetuneError as err:
        raise GazetuneError(f"{err}: nothing to register") from None
    metrics_path, config_path = folder / "metrics.json", folder / "config.json"
    try:
        metrics, config = (json.loads(p.read_text()) for p in (metrics_path, config_path))
    except (OSError, ValueError) as err:
        raise GazetuneError(f"checkpoint of run {run_id}: unreadable ({err})") from None
    if not isinstance(metrics, dict) or not isinstance(config, dict):
        raise GazetuneError(f"checkpoint of run {run_id}: config.json and metrics.json must "
                            f"hold JSON objects")
    size = metrics.get("image_size")
    if size is None:
        cache = str(config.get("cache", ""))
        size = prepared_size(cache) if cache else None
        if size is None:
            raise GazetuneError(f"checkpoint of run {run_id} records no image size and its "
                                f"cache {cache or '(none)'} is not here to say it: run export "
                                f"where the study's cache is")
    try:
        # refused here, not when a user loads the model
        Classifier.from_checkpoint(folder, image_size=size)
    except GazetuneError as err:
        raise GazetuneError(f"checkpoint of run {run_id}: {err}") from None
    return folder, size
