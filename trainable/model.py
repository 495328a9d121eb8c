"""The network of a trial: an smp U-Net whose encoder bottleneck also feeds a 3-class head
(only the encoder and head for a loss set without a decoder, `LossSet.decoder`).

Inputs are 1-channel radiographs in [0, 1]. With pretrained encoder weights (a name smp offers,
loaded by smp from the Hugging Face cache or Hub, `trainable.pretrained`; or a local file) the
input is repeated to 3 channels and normalised as those weights were trained, inside the model:
checkpoints, `trainable.inference` and the exported MLflow model then all take [0, 1] images,
and saliency maps stay maps of the 1-channel image the user sees.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from trainable.config import TrialConfig
from trainable.errors import GazetuneError
from trainable.loss_sets import LOSS_SETS, applies
from trainable.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_fetchable,
    input_statistics,
    is_named,
)


class GrayToPretrainedInput(nn.Module):
    """[B, 1, H, W] in [0, 1] → [B, 3, H, W] normalised like the encoder's pretraining data.

    The statistics are buffers, not parameters: fixed (no optimiser sees them) and saved in
    every checkpoint, so a model rebuilt without fetching the weights normalises alike. One
    grey channel repeated makes RGB and BGR orders the same input.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


class EncoderClassifier(nn.Module):
    """The U-Net's encoder and head without a decoder (logits only): the `classifier` loss set."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.classification_head = head

    def forward(self, x):
        return self.classification_head(self.encoder(x)[-1])


# The mask's region that `mask_gate=input` keeps: where the mask reaches this fraction of its
# range, as the gaze region of rrr and of counterexamples is where the heatmap reaches 0.1 of
# its maximum.
GATE_REGION = 0.1


class MaskGatedUnet(nn.Module):
    """The U-Net whose classifier sees only what the decoder's mask marks (`mask_gate`).

    The mask, trained towards the gaze heatmap, is scaled to [0, 1] per image (its min-max:
    the CC mask loss leaves its offset and scale free) and gates the classifier:

    - "pool": the head averages the encoder's deepest features weighted by the mask (resized
      to them) instead of uniformly;
    - "input": the encoder runs a second time, on the image set to zero where the mask is
      under `GATE_REGION` of its range, and the head pools those features.

    The gate is detached: only the gaze term shapes the mask, so the classification cannot
    open it where a shortcut lies. The same submodules (and state-dict keys) as smp's U-Net.

    Shape:
        x [B, C, H, W] -> mask_logits [B, 1, H, W], logits [B, 3].
    """

    def __init__(self, unet: nn.Module, mode: str):
        super().__init__()
        if mode not in ("pool", "input"):
            raise ValueError(f"mask gate {mode!r}: expected pool or input")
        self.mode = mode
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.segmentation_head = unet.segmentation_head
        self.classification_head = unet.classification_head

    def forward(self, x):
        features = self.encoder(x)
        mask = self.segmentation_head(self.decoder(features))
        gate = _unit_range(torch.sigmoid(mask.detach().float()))
        if self.mode == "input":
            region = (gate >= GATE_REGION).to(x.dtype)
            return mask, self.classification_head(self.encoder(x * region)[-1])
        deep = features[-1]
        weight = F.adaptive_avg_pool2d(gate, deep.shape[-2:]).to(deep.dtype)
        pooled = (deep * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1e-6)
        # smp's head with its pooling replaced by this weighted one.
        _pool, _flatten, dropout, linear, activation = self.classification_head
        return mask, activation(linear(dropout(pooled)))


def _unit_range(m: torch.Tensor) -> torch.Tensor:
    """Each image's map scaled to [0, 1] by its own minimum and maximum ([B, 1, H, W])."""
    low = m.amin((2, 3), keepdim=True)
    span = m.amax((2, 3), keepdim=True) - low
    return (m - low) / span.clamp_min(1e-6)


class WithInputTransform(nn.Module):
    """Applies `transform` before `net`, keeping `net`'s output (logits or (mask, logits))."""

    def __init__(self, transform: nn.Module, net: nn.Module):
        super().__init__()
        self.transform = transform
        self.net = net

    @property
    def encoder(self):
        return self.net.encoder

    def forward(self, x):
        return self.net(self.transform(x))


def build_model(cfg: TrialConfig, load_encoder_weights: bool = True) -> nn.Module:
    """The trial's model: `model(x)` → `(mask_logits, class_logits)`, or logits for a loss set
    without a decoder (`classifier`).

    `load_encoder_weights=False` builds the same network without reading `cfg.encoder_weights`
    (a checkpoint's state dict replaces them and the input statistics anyway, and the file may
    be on another machine, the Hub out of reach).

    Shape:
        x: [B, 1, H, W] with H, W multiples of 32; mask_logits [B, 1, H, W]; logits [B, 3].
    """
    import segmentation_models_pytorch as smp

    pretrained = cfg.encoder_weights is not None
    named = is_named(cfg.encoder, cfg.encoder_weights)
    fetch = named and load_encoder_weights  # smp loads named weights itself
    transform = GrayToPretrainedInput()  # ImageNet's statistics: a local file records none
    if fetch:
        check_fetchable(cfg.encoder, cfg.encoder_weights)  # one line, not smp's 20 s of retries
        transform = GrayToPretrainedInput(*input_statistics(cfg.encoder, cfg.encoder_weights))
    try:
        unet = smp.Unet(
            cfg.encoder,
            # smp's own loading (hf_hub_download, then the encoder's load_state_dict)
            encoder_weights=cfg.encoder_weights if fetch else None,
            in_channels=3 if pretrained else 1,
            classes=1,
            aux_params={"classes": 3, "pooling": "avg", "dropout": cfg.dropout,
                        "activation": None},
        )
    except (KeyError, ValueError) as err:
        raise GazetuneError(f"config key 'encoder' = {cfg.encoder!r}: {err}") from None
    if pretrained and not named and load_encoder_weights:
        _load_encoder_weights(unet.encoder, Path(cfg.encoder_weights))
    # EfficientNet's BatchNorm momentum is 0.01 (TensorFlow's 0.99 decay): after the few hundred
    # steps of a short trial the running statistics are still mostly their initial values, and
    # eval-mode features collapse to a constant (measured: identical predictions for every
    # validation image after 2 epochs). PyTorch's default 0.1 tracks them within tens of steps;
    # `calibrate_batchnorm` replaces the initial values before training.
    for module in unet.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    if not LOSS_SETS[cfg.loss_set].decoder:
        net = EncoderClassifier(unet.encoder, unet.classification_head)
    elif applies("mask_gate", cfg.loss_set) and cfg.mask_gate != "none":
        net = MaskGatedUnet(unet, cfg.mask_gate)
    else:
        net = unet
    return WithInputTransform(transform, net) if pretrained else net


def _load_encoder_weights(encoder: nn.Module, path: Path) -> None:
    """Load a local encoder state dict (never unpickles arbitrary objects): a torch file, or a
    `.safetensors` file such as the `model.safetensors` smp downloads for named weights."""
    if not path.is_file():
        raise GazetuneError(f"config key 'encoder_weights': no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any reader error: one line naming the file)
        raise GazetuneError(f"encoder weights {path}: cannot be read as a state dict "
                            f"({err})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GazetuneError(f"encoder weights {path}: not a state dict of tensors")
    # Compared here, not read from `load_state_dict`'s result: smp 0.6's encoders override it
    # and most return None. A classifier's fc layer may be left over; every encoder tensor must
    # be there with its shape.
    for key, tensor in encoder.state_dict().items():
        if key not in state:
            raise GazetuneError(f"encoder weights {path}: no tensor {key!r} (the first of the "
                                f"encoder's that is missing; is it a {type(encoder).__name__}?)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise GazetuneError(f"encoder weights {path}: {key!r} has shape "
                                f"{tuple(state[key].shape)}, the encoder's is {tuple(tensor.shape)}")
    encoder.load_state_dict(state, strict=False)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches) -> None:
    """Set BatchNorm running statistics to the averages over `batches` (train-mode forwards).

    A new network's running variance is 1 while its real activations are far smaller; without
    this the first epochs' eval-mode outputs are nearly constant across images.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.train()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def split_outputs(out) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(mask_logits or None, class_logits) from either model output form."""
    if isinstance(out, tuple):
        return out[0], out[1]
    return None, out
