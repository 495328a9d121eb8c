"""`encoder_weights=FILE`: a valid encoder state dict loads; a wrong one is refused in one line
naming the file and the first mismatching key."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from trainable.config import TrialConfig
from trainable.errors import GazetuneError
from trainable.model import build_model

ENCODER = "efficientnet-b0"


def encoder_state(seed: int = 3) -> dict:
    """A 3-channel EfficientNet-b0 encoder's own state dict, as smp builds it."""
    torch.manual_seed(seed)
    return smp.Unet(ENCODER, encoder_weights=None, in_channels=3, classes=1).encoder.state_dict()


def build(path) -> torch.nn.Module:
    return build_model(TrialConfig.from_dict({"encoder": ENCODER, "encoder_weights": str(path),
                                              "loss_set": "baseline"}))


def test_the_encoders_own_state_dict_loads(tmp_path):
    state = encoder_state()
    path = tmp_path / "encoder.pt"
    torch.save(state, path)
    loaded = build(path).encoder.state_dict()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    # The input becomes three ImageNet-normalised channels inside the model.
    assert build(path)(torch.rand(2, 1, 64, 64))[1].shape == (2, 3)


def test_a_checkpoint_with_a_state_dict_entry_and_a_leftover_fc_layer_loads(tmp_path):
    state = {**encoder_state(), "fc.weight": torch.zeros(10, 1280)}
    path = tmp_path / "classifier.pt"
    torch.save({"state_dict": state}, path)
    first = next(iter(encoder_state()))
    assert torch.equal(build(path).encoder.state_dict()[first], state[first])


def test_a_wrong_shape_is_refused_naming_the_file_and_the_key(tmp_path):
    state = encoder_state()
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(GazetuneError, match=rf"{path}: '{key}' has shape \(1, 1, 1, 1\)"):
        build(path)


def test_a_missing_tensor_and_a_non_state_dict_are_refused(tmp_path):
    state = encoder_state()
    key = next(iter(state))
    del state[key]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(GazetuneError, match=rf"{path}: no tensor '{key}'"):
        build(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(GazetuneError, match="not a state dict of tensors"):
        build(path)
