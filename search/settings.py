"""A search's options (`SearchSettings`), their file beside Tune's state, and `--set` parsing.

Everything needed to resume is saved in `<storage>/<name>/gazetune.json`, so `gazetune resume
NAME` needs no other option. The command line takes its defaults from the dataclass.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from search import storage, tracking
from search.names import check_name
from trainable.config import SELECTION_METRICS, ConfigError, TrialConfig, parse_overrides
from trainable.errors import GazetuneError
from trainable.pretrained import is_named

SETTINGS_FILE = "gazetune.json"
# Set by the service itself, each from its own option.
RESERVED_KEYS = {"cache": "--cache", "epochs": "--max-epochs",
                 "gpu_memory_fraction": "--gpus-per-trial", "checkpoint_dir": None}
# The numeric options' ranges, checked before anything starts.
RANGES = {"samples": (1, 100_000), "max_epochs": (1, 10_000), "grace_period": (1, 10_000),
          "reduction_factor": (2, 100), "cpus_per_trial": (0.01, 1024),
          "gpus_per_trial": (0, 64), "max_concurrent": (1, 10_000), "max_failures": (0, 100),
          "seed": (0, 2**32 - 1)}


@dataclass(frozen=True)
class SearchSettings:
    """A search's options: what `gazetune search` was given, resolved to absolute locations."""

    name: str
    space: str = "paper"
    samples: int = 16
    max_epochs: int = 20
    grace_period: int = 2
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 0.25 when the cluster has GPUs, else 0
    max_concurrent: int | None = None  # None: as many as the resources allow
    seed: int = 0
    paper_points: bool = False
    fixed: dict = field(default_factory=dict)  # trial settings, typed (`--set KEY=VALUE`)
    max_failures: int = 2
    address: str | None = None  # a Ray cluster; None starts a local one
    storage: str = "ray_results"  # Tune's storage: an absolute path or a URI
    cache: str = "cache"
    tracking_uri: str | None = None
    # Explicit trial configs run instead of the space's suggestions, in order, each to
    # max_epochs (never stopped early): `gazetune repeat`'s retraining of chosen trials.
    points: list = field(default_factory=list)
    repeat_of: dict | None = None  # what `points` repeat: the study, its trials and the seeds
    experiment_id: str | None = None  # filled in when the search starts
    parent_run_id: str | None = None

    @property
    def metric(self) -> str:
        """The validation metric the trials select by and ASHA and Optuna optimise: the
        trials' `selection` (`--set selection=gaze_auc`; a repeat's configs carry their own)."""
        config = {**self.fixed, **(self.points[0] if self.points else {})}
        return SELECTION_METRICS[config.get("selection", TrialConfig.selection)]

    @property
    def path(self) -> str:
        """The experiment's folder (or URI) in Tune's storage."""
        return f"{self.storage.rstrip('/')}/{self.name}"

    def resolved(self, workdir: Path) -> SearchSettings:
        """Absolute paths and URIs: Ray runs each trial in its own directory."""
        fixed = dict(self.fixed)
        weights = fixed.get("encoder_weights")
        if weights is not None and not is_named(fixed.get("encoder", TrialConfig.encoder),
                                                weights):
            fixed["encoder_weights"] = str(storage.absolute(weights, workdir))  # a file
        return dataclasses.replace(
            self,
            storage=storage.located(self.storage, workdir),
            cache=str(storage.absolute(self.cache, workdir)),
            tracking_uri=tracking.resolve_tracking_uri(self.tracking_uri, workdir),
            fixed=fixed,
        )

    def check_options(self) -> None:
        """Refuse a name or a numeric option out of range, naming the option."""
        check_name(self.name, "--name")
        for option in RANGES:
            check_option(option, getattr(self, option))
        if self.grace_period > self.max_epochs:
            raise ConfigError(f"--grace-period {self.grace_period} exceeds --max-epochs "
                              f"{self.max_epochs}")

    def params(self) -> dict:
        """The parent run's params: the options a person compares searches by."""
        skip = {"experiment_id", "parent_run_id", "tracking_uri", "points"}  # points: runs'
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in skip and not (k == "repeat_of" and v is None)}

    def save(self) -> None:
        """Write `<storage>/<name>/gazetune.json` in one step (a killed driver leaves the old)."""
        storage.write_text(f"{self.path}/{SETTINGS_FILE}",
                           json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str) -> SearchSettings:
        """Read a settings file (`path` may also be the experiment folder)."""
        if not str(path).endswith(".json"):
            path = f"{str(path).rstrip('/')}/{SETTINGS_FILE}"
        try:
            return cls.from_json(storage.read_text(path), path)
        except FileNotFoundError:
            raise GazetuneError(f"no search settings at {path}: not a gazetune search, or "
                                f"another --storage") from None
        except OSError as err:  # e.g. --storage under a regular file
            raise GazetuneError(f"search settings {path} cannot be read: "
                                f"{err.strerror or err}") from None

    @classmethod
    def from_json(cls, text: str, where: str) -> SearchSettings:
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as err:
            raise GazetuneError(f"search settings {where} cannot be read: {err}") from None


DEFAULTS = SearchSettings(name="")  # the command line's defaults


def check_option(option: str, value) -> None:
    """Refuse a value of a numeric option (a `SearchSettings` field) outside its range."""
    low, high = RANGES[option]
    if value is None and option in ("gpus_per_trial", "max_concurrent"):
        return  # chosen from the cluster
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not low <= value <= high:  # NaN fails too
        raise ConfigError(f"--{option.replace('_', '-')} must be in [{low:g}, {high:g}], got "
                          f"{value!r}")


def load_settings(name: str, storage_path: str = DEFAULTS.storage,
                  workdir: Path | None = None) -> SearchSettings:
    """The saved settings of search `name`, its storage as given now (the folder may move)."""
    check_name(name)
    located = storage.located(storage_path, Path(workdir or Path.cwd()))
    settings = SearchSettings.load(f"{located.rstrip('/')}/{name}")
    return dataclasses.replace(settings, storage=located)


def parse_fixed(items: list[str]) -> dict:
    """`--set KEY=VALUE` items as typed trial settings; unknown keys and bad values refused."""
    for item in items:
        key = item.partition("=")[0].strip()
        if key in RESERVED_KEYS:
            option = RESERVED_KEYS[key]
            raise ConfigError(f"--set {key}: the search sets {key!r} itself"
                              + (f"; use {option}" if option else ""))
    try:
        raw = parse_overrides(items)
    except ConfigError as err:
        raise ConfigError(f"--set: {err}") from None
    cfg = TrialConfig.from_dict(raw)
    return {key: getattr(cfg, key) for key in raw}
