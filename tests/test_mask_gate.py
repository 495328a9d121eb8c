"""The mask-gated classifier (`mask_gate`): what the gaze-trained mask closes, the classifier
cannot read, and the classification cannot reopen it."""

import numpy as np
import pytest
import torch

from trainable import train
from trainable.config import TrialConfig
from trainable.inference import Classifier
from trainable.model import GATE_REGION, MaskGatedUnet, build_model


def gated(mode: str, loss_set: str = "baseline") -> MaskGatedUnet:
    torch.manual_seed(0)
    model = build_model(TrialConfig.from_dict(
        {"loss_set": loss_set, "encoder": "tu-resnet10t", "mask_gate": mode, "dropout": 0.0}))
    assert isinstance(model, MaskGatedUnet)
    return model.eval()


def with_mask(model: MaskGatedUnet, mask: torch.Tensor):
    """The model's segmentation head answers `mask` (logits) whatever the image."""
    return model.segmentation_head.register_forward_hook(
        lambda module, inputs, output: mask.expand_as(output).clone())


def left_half(size: int = 64) -> torch.Tensor:
    """Mask logits high on the left half of the image, low on the right."""
    mask = torch.full((1, 1, size, size), -6.0)
    mask[..., : size // 2] = 6.0
    return mask


def test_the_input_gate_reads_nothing_outside_the_mask():
    model = gated("input")
    handle = with_mask(model, left_half())
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    _, logits = model(x)
    (grad,) = torch.autograd.grad(logits.sum(), x)
    handle.remove()
    assert grad[..., :32].abs().sum() > 0
    assert grad[..., 32:].abs().sum() == 0
    # What lies outside the region does not move the logits at all.
    y = x.detach().clone()
    y[..., 32:] = torch.rand_like(y[..., 32:])
    handle = with_mask(model, left_half())
    torch.testing.assert_close(model(y)[1], logits.detach())
    handle.remove()


def test_the_pool_gate_averages_the_deepest_features_under_the_mask():
    model = gated("pool")
    x = torch.rand(2, 1, 64, 64)
    handle = with_mask(model, left_half())
    _, logits = model(x)
    handle.remove()
    deep = model.encoder(x)[-1]  # [B, C, 2, 2] at 64 px
    expected = model.classification_head[3](deep[..., :1].mean((2, 3)))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["pool", "input"])
def test_the_classification_cannot_open_the_gate(mode):
    """The gate is detached: the classification's gradient reaches the encoder and the head,
    never the decoder or the mask head, which only the gaze term trains."""
    model = gated(mode).train()
    _, logits = model(torch.rand(4, 1, 64, 64))
    logits.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    for part in (model.decoder, model.segmentation_head):
        assert all(p.grad is None for p in part.parameters())


def test_the_gate_region_is_the_masks_own_range():
    """Min-max per image: the CC mask loss leaves the mask's offset and scale free, so the same
    mask shifted or scaled keeps the same region."""
    model = gated("input")
    x = torch.rand(1, 1, 64, 64, requires_grad=True)
    grads = []
    for mask in (left_half(), left_half() * 0.5 + 1.0):
        handle = with_mask(model, mask)
        grads.append(torch.autograd.grad(model(x)[1].sum(), x)[0] != 0)
        handle.remove()
    assert torch.equal(grads[0], grads[1])
    assert 0 < GATE_REGION < 1


def test_the_key_applies_where_the_mask_learns_the_gaze():
    assert type(build_model(TrialConfig.from_dict(
        {"loss_set": "set3", "encoder": "tu-resnet10t", "mask_gate": "input"}))) is MaskGatedUnet
    # Elsewhere the key changes nothing (the classifier has no mask; set2's learns a map).
    for loss_set in ("classifier", "set2", "rrr_abs"):
        model = build_model(TrialConfig.from_dict(
            {"loss_set": loss_set, "encoder": "tu-resnet10t", "mask_gate": "input"}))
        assert not isinstance(model, MaskGatedUnet)
    with pytest.raises(ValueError, match="mask_gate"):
        TrialConfig.from_dict({"mask_gate": "decoder"})


def test_a_gated_trial_trains_and_its_checkpoint_classifies(small_cache, tmp_path):
    final = train({"cache": str(small_cache), "loss_set": "baseline", "mask_gate": "input",
                   "epochs": 1, "batch_size": 8, "n_boot": 50, "figures": 1, "threads": 2,
                   "encoder": "tu-resnet10t", "checkpoint_dir": str(tmp_path / "ck")})
    assert np.isfinite(final["val/auc/mean"])
    classifier = Classifier.from_checkpoint(tmp_path / "ck")
    assert isinstance(classifier.model, MaskGatedUnet) and classifier.model.mode == "input"
    size = classifier.image_size
    probs = classifier.probabilities(np.random.default_rng(0).random((2, size, size), np.float32))
    assert probs.shape == (2, 3) and np.all((probs >= 0) & (probs <= 1))
