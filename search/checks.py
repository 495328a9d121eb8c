"""The up-front checks of a search: refuse one that cannot work before Ray starts, in a message
naming the option, key or folder at fault."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.samplers import PartialFixedSampler, RandomSampler
from ray.tune import Tuner

from search import storage, tracking
from search.settings import SETTINGS_FILE, SearchSettings
from spaces import get_space, sample
from trainable.config import ConfigError, TrialConfig
from trainable.data.cache import check_splits
from trainable.errors import GazetuneError
from trainable.files import check_writable
from trainable.pretrained import check_available


def check_new_search(settings: SearchSettings) -> None:
    """Options, space, fixed settings, cache and storage of a search about to start."""
    settings.check_options()
    try:
        space = get_space(settings.space)
    except KeyError as err:
        raise ConfigError(f"--space: {err.args[0]}") from None
    if settings.points:
        _check_points(settings)
    else:
        _check_fixed(space, settings)
    if not storage.is_uri(settings.cache) and not Path(settings.cache).is_dir():
        raise GazetuneError(f"cache {settings.cache} does not exist: run `gazetune prepare` "
                            f"first or pass --cache")
    if storage.exists(f"{settings.path}/{SETTINGS_FILE}") or _can_restore(settings.path):
        raise GazetuneError(f"a search named {settings.name!r} already exists at "
                            f"{settings.path}: `gazetune resume {settings.name}` continues it, "
                            f"or choose another --name")
    if not storage.is_uri(settings.cache):  # a cache on a URI is read by the trials, not here
        check_splits(settings.cache)
    check_encoder_weights(settings)
    check_storage(settings)  # last: it creates the storage folder


def check_encoder_weights(settings: SearchSettings) -> None:
    """The fixed (or default) encoder weights, or each given config's, as
    `trainable.pretrained.check_available` checks them; a weights file only on a local search
    (on a cluster it may be on the workers only)."""
    configs = [{**settings.fixed, **point} for point in settings.points] or [settings.fixed]
    for encoder, weights in dict.fromkeys((c.get("encoder", TrialConfig.encoder),
                                           c.get("encoder_weights")) for c in configs):
        check_available(encoder, weights, local=settings.address is None)


def check_storage(settings: SearchSettings) -> None:
    """Refuse local folders the search cannot write (Tune's storage, the embedded MLflow store)
    before Ray starts, rather than when the first trial reports."""
    if not storage.is_uri(settings.storage):
        check_writable(settings.storage, "search storage (--storage)")
    tracking.check_store_writable(settings.tracking_uri)


def partial_fixed(fixed: dict, sampler) -> PartialFixedSampler:
    """`sampler` with the `--set` values that the space also samples held fixed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return PartialFixedSampler(fixed, sampler)


def _check_fixed(space: Callable, settings: SearchSettings) -> None:
    """Fixed settings must form a valid trial config with whatever the space samples."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=partial_fixed(settings.fixed, RandomSampler(0)))
    for _ in range(50):  # enough draws to reach every branch of the spaces here
        try:
            sampled = sample(space, study.ask())
        except ValueError as err:  # a fixed value outside the space's choices
            raise ConfigError(f"--set {settings.fixed}: not in space {settings.space!r}: "
                              f"{err}") from None
        # A space's constants (the paper space's recipe) win over fixed settings, and Optuna
        # never asks the sampler about a categorical of one choice: a fixed value there would
        # be dropped without a word.
        for key, value in sampled.items():
            if key in settings.fixed and settings.fixed[key] != value:
                raise ConfigError(f"--set {key}={settings.fixed[key]}: space "
                                  f"{settings.space!r} sets {key}={value}; --space extended "
                                  f"searches it")
        TrialConfig.from_dict({**settings.fixed, **sampled, "cache": settings.cache,
                               "epochs": settings.max_epochs})


def _check_points(settings: SearchSettings) -> None:
    """Each given config, with the fixed settings, must be a valid trial config."""
    if len(settings.points) != settings.samples:
        raise ConfigError(f"{len(settings.points)} given configs for {settings.samples} trials")
    if any(point.keys() != settings.points[0].keys() for point in settings.points):
        raise ConfigError("the given configs must set the same keys")
    for i, point in enumerate(settings.points):
        try:
            TrialConfig.from_dict({**settings.fixed, **point, "cache": settings.cache,
                                   "epochs": settings.max_epochs})
        except ConfigError as err:
            raise ConfigError(f"config {i} of the search: {err}") from None


def _can_restore(path: str) -> bool:
    try:
        return Tuner.can_restore(path)
    except (NotADirectoryError, PermissionError):  # refused with its reason by check_storage
        return False
