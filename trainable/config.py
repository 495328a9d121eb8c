"""One trial's settings: a frozen dataclass built once from the search's config dict.

Everything below `train(config)` receives a `TrialConfig`, never the raw dict, so a key that
does not exist or has the wrong type is refused at the door with a message naming it. Also the
names every part of the project shares: the classes (`CLASS_NAMES`), the metric that model
selection and the search maximise (`METRIC`), and the command line's KEY=VALUE overrides
(`parse_overrides`). Which keys apply to which loss set: `trainable.loss_sets.applies`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field

from trainable import loss_sets
from trainable.errors import GazetuneError

GENERATORS = ("guided_backprop", "deconvnet", "gradient", "gradcam")
# What `trainable.augment.gaze_counterexamples` puts outside the gaze region.
COUNTEREXAMPLE_FILLS = ("swap", "mean", "noise", "blur")
# Whose gaze region a counterexample keeps (`trainable.augment.gaze_counterexamples`).
COUNTEREXAMPLE_OUTLINES = ("own", "other", "batch")
# The classes, in the order of the one-hot labels (the master sheet's columns) and of reports.
CLASS_NAMES = ("Normal", "CHF", "pneumonia")
METRIC = "val/auc/mean"  # what model selection (trainable.loop) and the search maximise
# ... unless a trial selects by the AUC on gaze counterexamples of the validation images
# (`selection=gaze_auc`, `trainable.loop.counterexample_auc`).
SELECTION_METRICS = {"auc": METRIC, "gaze_auc": "val/gaze_auc/mean"}


def matters(key: str, config) -> bool:
    """Whether config `key` changes the training of a trial whose config (a mapping) is
    `config`: it applies to the trial's loss set (`trainable.loss_sets.applies`), and the
    settings of counterexamples only while `counterexample` is on. What a person compares
    runs by: MLflow's params and the search's progress lines list only these."""
    loss_set = config.get("loss_set", "baseline")
    if loss_set in loss_sets.LOSS_SETS and not loss_sets.applies(key, loss_set):
        return False
    return not (key.startswith("counterexample_")
                and config.get("counterexample", "none") == "none")


class ConfigError(GazetuneError, ValueError):
    """A trial config with an unknown key, a wrong type or an impossible value."""


def key(default, meaning: str, *, choices: tuple | None = None,
        bounds: tuple[float, float] | None = None, open_low: bool = False,
        open_high: bool = False, pattern: str | None = None):
    """A config key: its default, one line of meaning and the values it accepts.

    `bounds` is an interval (closed unless `open_low`/`open_high`; NaN and infinities are never
    inside), `choices` a set of words, `pattern` a regular expression a string must match.
    The same metadata checks a config (`TrialConfig.check`) and documents it (`describe_keys`).
    """
    return field(default=default, metadata={
        "meaning": meaning, "choices": choices, "bounds": bounds, "open_low": open_low,
        "open_high": open_high, "pattern": pattern})


@dataclass(frozen=True)
class TrialConfig:
    # data
    cache: str = key("cache", "the prepared cache folder (`gazetune prepare`)", pattern=r".+")
    # method
    loss_set: str = key("baseline", "what enters the loss besides classification",
                        choices=tuple(loss_sets.LOSS_SETS))
    generator: str = key("guided_backprop", "saliency map of the set1/set2/set3 terms",
                         choices=GENERATORS)
    r: float = key(0.5, "set3 mixing ratio: r * L(mask, gaze) + (1 - r) * L(map, gaze)",
                   bounds=(0.0, 1.0))
    loss_weight: float = key(1.0, "weight of the heatmap terms against the classification loss",
                             bounds=(0.0, 1e4))
    rrr_lambda: float = key(10.0, "rrr: weight of the input-gradient penalty outside the "
                            "gaze; rrr_abs: its weight in units of the ratio of the "
                            "classification's to the penalty's parameter gradient at "
                            "initialisation (1: the two pull equally hard at the start)",
                            bounds=(0.0, 1e6))
    cls_ramp: float = key(0.0, "epochs over which the classification term's weight rises "
                          "linearly from 0 to 1, step by step, so that the gaze terms shape the "
                          "network before the labels can teach it a shortcut; 0: weight 1 "
                          "from the first step", bounds=(0.0, 1e4))
    mask_gate: str = key("none", "baseline/set3: the decoder's mask (trained towards the gaze, "
                         "detached) gates the classifier: pool = the head averages the deepest "
                         "features weighted by the mask; input = the encoder runs again on the "
                         "image zeroed where the mask is under 0.1 of its range; none: off",
                         choices=("none", "pool", "input"))
    seg_loss: str = key("cc", "loss of the decoder's mask: cc (1 - Pearson CC) or bce (BCE "
                        "with logits, the paper's)", choices=("cc", "bce"))
    gaze_target: str = key("heatmap", "gaze target of the losses: heatmap (as cached) or "
                           "reference (the dataset authors' viridis-to-grey rendering)",
                           choices=("heatmap", "reference"))
    map_outputs: str = key("true_class", "set1/set3/rrr: constrain the map of the true class's "
                           "output or of every class's output", choices=("true_class", "all"))
    # model
    encoder: str = key("efficientnet-b0", "smp encoder name (e.g. efficientnet-b0, "
                        "tu-resnet10t)", pattern=r"[A-Za-z0-9_.-]+")
    encoder_weights: str | None = key(None, "None (random init), a weight name smp offers for "
                                      "the encoder (efficientnet-b0: imagenet, advprop), or a "
                                      "local encoder state-dict file (.pt, .safetensors)")
    dropout: float = key(0.2, "dropout before the classification head", bounds=(0.0, 1.0),
                         open_high=True)
    # optimisation
    optimizer: str = key("adam", "optimiser", choices=("adam", "adamw"))
    lr: float = key(1e-3, "learning rate", bounds=(0.0, 1.0), open_low=True)
    weight_decay: float = key(0.0, "weight decay", bounds=(0.0, 1.0))
    schedule: str = key("cosine", "per-epoch learning-rate schedule (cyclic: the dataset "
                        "authors' triangular2)", choices=("constant", "cosine", "cyclic"))
    cyclic_step: int = key(2, "cyclic: epochs per half cycle", bounds=(1, 10_000))
    grad_clip: float = key(1.0, "maximum gradient norm; 0 disables clipping",
                           bounds=(0.0, 1e6))
    epochs: int = key(10, "epochs to train", bounds=(1, 10_000))
    batch_size: int = key(32, "images per step (at least 2: BatchNorm)", bounds=(2, 65_536))
    augment: bool = key(True, "random affine and exposure jitter of training images")
    counterexample: str = key("none", "gaze-guided counterexamples: outside each training "
                              "image's gaze region put the same pixels of another image of the "
                              "batch (swap), the image's mean, uniform noise or a blurred copy; "
                              "none: off", choices=("none", *COUNTEREXAMPLE_FILLS))
    counterexample_p: float = key(1.0, "share of training images given a counterexample",
                                  bounds=(0.0, 1.0))
    counterexample_region: float = key(0.1, "the gaze region of counterexamples: where the "
                                       "heatmap reaches this fraction of its maximum",
                                       bounds=(0.0, 1.0), open_low=True, open_high=True)
    counterexample_outline: str = key(
        "own", "whose gaze region a counterexample keeps: its own, another image's of the batch "
        "(other), or the union of the batch's (batch); other and batch keep the outline from "
        "telling the class", choices=COUNTEREXAMPLE_OUTLINES)
    counterexample_consistency: float = key(
        0.0, "weight of a consistency term: each training image is kept beside its "
        "counterexample, the classification loss is taken on the counterexample and each "
        "image's class probabilities are pulled towards its counterexample's (Jensen-Shannon "
        "divergence); 0: the counterexample replaces the image", bounds=(0.0, 1e4))
    seed: int = key(0, "seed of initialisation, shuffling, augmentation and the bootstrap",
                    bounds=(0, 2**32 - 1))
    selection: str = key("auc", "the validation score that picks the best epoch (the "
                         "checkpoint) and that a search optimises: auc = val/auc/mean; gaze_auc"
                         " = val/gaze_auc/mean, on validation images whose outside-gaze area "
                         "holds another validation image's pixels", choices=tuple(
                             SELECTION_METRICS))
    # evaluation
    n_boot: int = key(0, "bootstrap resamples; 0: the protocol's default (2,000; paper: 30)",
                      bounds=(0, 1_000_000))
    boot_protocol: str = key("stratified", "bootstrap: stratified, or the paper's (30 "
                             "resamples of about 55% of the images, their median as the AUC)",
                             choices=("stratified", "paper"))
    figures: int = key(3, "images per class drawn when the best epoch improves; 0 disables",
                       bounds=(0, 100))
    # runtime
    device: str = key("auto", "auto, cpu, cuda or cuda:N", pattern=r"auto|cpu|cuda(:\d+)?")
    amp: bool = key(True, "bf16 autocast on CUDA (ignored on the CPU)")
    channels_last: bool = key(True, "channels-last memory format on CUDA")
    gpu_memory_fraction: float = key(0.0, "cap of this process's share of the GPU memory; 0: "
                                     "no cap", bounds=(0.0, 1.0))
    threads: int = key(0, "torch CPU threads; 0 keeps torch's default", bounds=(0, 4096))
    checkpoint_dir: str | None = key(None, "where the best and last checkpoints go; None: a "
                                     "temporary folder")

    @classmethod
    def from_dict(cls, config: dict) -> TrialConfig:
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
        """Every key against its declared range, choices or pattern (`key`)."""
        for f in dataclasses.fields(self):
            why = _out_of_range(getattr(self, f.name), f.metadata)
            if why:
                raise ConfigError(f"config key {f.name!r} = {getattr(self, f.name)!r}: {why}")
        _check_encoder_weights(self.encoder, self.encoder_weights)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def metric(self) -> str:
        """The validation metric that picks the best epoch (`selection`)."""
        return SELECTION_METRICS[self.selection]


def _check_encoder_weights(encoder: str, weights: str | None) -> None:
    """A weight name must be one smp offers for the encoder; anything else must look like a
    file (a '/' or a suffix), so that a mistyped name is refused here, not as a missing file
    inside a trial. The file itself is read where the trial runs (it may be on a worker)."""
    if weights is None:
        return
    from trainable.pretrained import weight_names  # imports smp: only for a value to check

    names = weight_names(encoder)
    if weights in names or "/" in weights or "." in weights:
        return
    offered = (f"one smp offers for encoder {encoder!r} ({', '.join(names)})" if names
               else f"smp offers no named weights for encoder {encoder!r}")
    raise ConfigError(f"config key 'encoder_weights' = {weights!r}: neither a weight name, "
                      f"{offered}, nor a weights file (a path with '/' or a suffix such as "
                      f".pt), nor None")


def _out_of_range(value, meta) -> str | None:
    """Why `value` is outside the key's declared values; None when it is inside."""
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}"
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        return f"must match {meta['pattern']}"
    if meta.get("bounds"):
        low, high = meta["bounds"]
        inside = (math.isfinite(value)
                  and (low < value if meta["open_low"] else low <= value)
                  and (value < high if meta["open_high"] else value <= high))
        if not inside:
            return f"must be in {_interval(meta)}"
    return None


def _interval(meta) -> str:
    low, high = (str(v) if isinstance(v, int) else f"{v:g}" for v in meta["bounds"])
    return (f"{'(' if meta['open_low'] else '['}{low}, {high}"
            f"{')' if meta['open_high'] else ']'}")


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(key, default, accepted values, meaning) of every config key, in declaration order."""
    hints = typing.get_type_hints(TrialConfig)
    rows = []
    for f in dataclasses.fields(TrialConfig):
        meta, hint = f.metadata, hints[f.name]
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kind = " or ".join("None" if t is type(None) else t.__name__ for t in kinds)
        if meta["choices"]:
            accepted = " | ".join(meta["choices"])
        elif meta["bounds"]:
            accepted = f"{kind} in {_interval(meta)}"
        else:
            accepted = kind
        rows.append((f.name, str(f.default), accepted, meta["meaning"]))
    return rows


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


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE strings from the command line → a config dict (values typed by TrialConfig)."""
    config = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        config[name.strip()] = value
    TrialConfig.from_dict(config)  # fail now, naming the key, rather than inside a worker
    return config
