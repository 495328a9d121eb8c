"""The Ray session of a search: the given cluster or a new local one, and the GPU share of a
trial on it."""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from pathlib import Path

import ray

from search import packing, storage
from search.settings import SearchSettings
from trainable.config import TrialConfig
from trainable.data.cache import MANIFEST


@contextmanager
def ray_session(address: str | None):
    """A Ray session: the given cluster, or a new local one (never someone else's `ray start`)."""
    # Tune reports a harmless warning whenever checkpoints force frequent state snapshots,
    # and its default console output repeats what ProgressPrinter says (legacy + verbose=0:
    # nothing).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Snapshot Tune's state every second (default: every 10 s or more): a new trial is then
    # saved before it has started a process and opened its MLflow run, so a killed driver
    # leaves no run that the resumed search does not know.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # A failed trial is one line of ProgressPrinter (its error, in full, is in the trial's
    # error.txt in Tune's storage); Tune's default adds the whole remote traceback each time.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    if address and "RAY_AUTH_MODE" not in os.environ and _have_ray_token():
        # Ray sends its token only to clusters it starts itself or finds with "auto"; a
        # cluster started with token authentication (cluster.yaml) refuses a driver without it.
        os.environ["RAY_AUTH_MODE"] = "token"
    if address:
        ray.init(address=address)
    else:
        # A new local cluster (Ray turns token authentication on for it by default), without
        # the dashboard and without the Prometheus metrics endpoints an unconfigured Ray opens
        # on 0.0.0.0. What remains cannot be confined to 127.0.0.1 in Ray 2.60: its gRPC
        # servers (GCS, raylet, workers, this driver) bind every interface, and it maps a node
        # address of 127.0.0.1 to the machine's own (`resolve_ip_for_localhost`), where its
        # runtime-env and dashboard agents serve HTTP; the token guards the gRPC servers. The
        # autoscaler monitor and the dashboard head still serve Prometheus metrics on 0.0.0.0
        # (ports 44217, 44227): Ray binds them to loopback only for a loopback head address.
        os.environ.setdefault("RAY_enable_metrics_collection", "0")
        ray.init(address="local", include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _have_ray_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def with_gpu_share(settings: SearchSettings) -> SearchSettings:
    """Resolve `gpus_per_trial=None`: as many trials per GPU as fit the smallest GPU of the
    cluster at the cache's image size and the trials' batch size (`search.packing`), up to
    four; 0 on a cluster without GPUs."""
    if settings.gpus_per_trial is not None:
        return settings
    gpu_gib = packing.smallest_gpu_memory_gib(ray.nodes())
    if gpu_gib is None:
        return dataclasses.replace(settings, gpus_per_trial=0.0)
    batch = settings.fixed.get("batch_size", TrialConfig.batch_size)
    share = packing.default_gpu_share(_image_size(settings.cache), batch, gpu_gib)
    return dataclasses.replace(settings, gpus_per_trial=share)


def _image_size(cache: str) -> int:
    """The image size of a prepared cache, from its manifest; 224 (the paper's) for a cache
    this machine cannot read (a URI: the trials read it, not the driver)."""
    if storage.is_uri(cache):
        return 224
    return int(json.loads((Path(cache) / MANIFEST).read_text())["params"]["size"])
