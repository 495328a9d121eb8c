"""One trial's settings: a frozen dataclass built once from the search's config dict.

Everything below `train(config)` receives a `TrialConfig`, never the raw dict, so a key that
does not exist or has the wrong type is refused at the door with a message naming it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from trainable.errors import GazetuneError

LOSS_SETS = ("classifier", "baseline", "set1", "set2", "set3", "rrr")
# Loss sets that compute a generator map (rrr always uses the plain input gradient).
USES_GENERATOR = ("set1", "set2", "set3")
GENERATORS = ("guided_backprop", "deconvnet", "gradient", "gradcam")
CLASS_NAMES = ("Normal", "CHF", "pneumonia")


class ConfigError(GazetuneError, ValueError):
    """A trial config with an unknown key, a wrong type or an impossible value."""


@dataclass(frozen=True)
class TrialConfig:
    # data
    cache: str = "cache"
    # method
    loss_set: str = "baseline"
    generator: str = "guided_backprop"
    r: float = 0.5  # set3: r * L(M, E) + (1 - r) * L(G, E)
    loss_weight: float = 1.0  # weight of the heatmap terms against the classification loss
    rrr_lambda: float = 10.0
    # model
    encoder: str = "efficientnet-b0"
    encoder_weights: str | None = None  # None, or a local state-dict file of the encoder
    dropout: float = 0.2
    # optimisation
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | cosine | cyclic (the dataset authors' triangular2)
    cyclic_step: int = 2
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    epochs: int = 10
    batch_size: int = 32
    augment: bool = True
    seed: int = 0
    # evaluation
    n_boot: int = 0  # bootstrap resamples; 0: the protocol's default (2,000; paper: 30)
    boot_protocol: str = "stratified"  # stratified | paper (30 resamples of ~55% of the images)
    figures: int = 3  # images per class drawn each time the best epoch improves; 0 disables
    # runtime
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    channels_last: bool = True  # on CUDA
    gpu_memory_fraction: float = 0.0  # cap this process's share of the GPU (fractional trials)
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    checkpoint_dir: str | None = None  # where the best/last checkpoints go; None: no files

    @classmethod
    def from_dict(cls, config: dict) -> "TrialConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}"
            )
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(k, v, hints[k]) for k, v in config.items()}
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r} = {getattr(self, key)!r}: {why}")

        need(self.loss_set in LOSS_SETS, "loss_set", f"must be one of {LOSS_SETS}")
        need(self.generator in GENERATORS, "generator", f"must be one of {GENERATORS}")
        need(0.0 <= self.r <= 1.0, "r", "must be in [0, 1]")
        need(self.lr > 0, "lr", "must be positive")
        need(self.epochs >= 1, "epochs", "must be at least 1")
        need(self.batch_size >= 2, "batch_size", "must be at least 2 (BatchNorm)")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.optimizer in ("adam", "adamw"), "optimizer", "must be adam or adamw")
        need(self.schedule in ("constant", "cosine", "cyclic"), "schedule",
             "must be constant, cosine or cyclic")
        need(self.boot_protocol in ("stratified", "paper"), "boot_protocol",
             "must be stratified or paper")
        need(0.0 <= self.gpu_memory_fraction <= 1.0, "gpu_memory_fraction", "must be in [0, 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, value, hint):
    """Accept a value of the declared type (or a string from the command line that parses)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    base = next(t for t in allowed if t is not type(None))
    if isinstance(value, str) and type(None) in allowed and value.strip().lower() in ("none", "null"):
        return None  # `encoder_weights=None` on the command line means no file
    if isinstance(value, str) and base is not str:
        text = value.strip()
        try:
            if base is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                return text.lower() in ("true", "1")
            return base(text)
        except ValueError:
            raise ConfigError(f"config key {key!r}: {value!r} is not a {base.__name__}") from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"config key {key!r}: expected {base.__name__}, got {type(value).__name__} {value!r}"
        )
    return value
