"""`encoder_weights`: a weights file, or a weight name smp offers (`imagenet`), loaded by smp.

A file: a valid encoder state dict loads; a wrong one is refused in one line naming the file and
the first mismatching key. A name: smp's own loading fed offline from a Hugging Face cache the
test fills (the layout `hf_hub_download` reads) with weights it writes; the normalisation layer
inside the model; a checkpoint that loads with no weights to fetch; the one-line refusal, before
any trial, when the weights can be had neither from the cache nor from the Hub; the default
from the cache's origin.
"""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import segmentation_models_pytorch as smp
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from search.cli import main
from trainable.config import ConfigError, TrialConfig
from trainable.errors import GazetuneError
from trainable.model import build_model
from trainable.pretrained import WeightsUnavailable, check_fetchable, hub_location

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


# ---------------------------------------------------------------------------------------------
# Named weights through smp's own loading, offline

# Statistics unlike ImageNet's, so that the test sees they come from the weights' config.json.
HUB_MEAN, HUB_STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.125]


def use_hub_cache(monkeypatch, folder) -> None:
    """huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: set its constants
    (what the variables become in a fresh process), and the variables for any child process."""
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> dict:
    """A Hugging Face cache holding smp's `imagenet` efficientnet-b0 files at smp's pinned
    revision, written here from a randomly initialised encoder; offline mode on. Returns the
    encoder state dict it wrote."""
    repo, revision = hub_location(ENCODER, "imagenet")
    # hf_hub_download's layout: models--OWNER--NAME/snapshots/REVISION/FILE (its blobs and
    # symlinks are a space saving; a file in the snapshot is read alike).
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    state = encoder_state(seed=5)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps(
        {"input_space": "RGB", "input_range": [0, 1], "mean": HUB_MEAN, "std": HUB_STD}))
    use_hub_cache(monkeypatch, tmp_path / "hub")
    return state


def build_named(weights: str = "imagenet", **config) -> torch.nn.Module:
    return build_model(TrialConfig.from_dict({"encoder": ENCODER, "encoder_weights": weights,
                                              "loss_set": "baseline", **config}))


def test_imagenet_weights_load_through_smp_from_a_prefilled_cache_offline(hub_cache):
    model = build_named()
    loaded = model.encoder.state_dict()
    assert loaded.keys() == hub_cache.keys()
    for key, tensor in hub_cache.items():
        assert torch.equal(loaded[key], tensor), key
    # The classifier-only network takes the same weights.
    head_only = build_named(loss_set="classifier")
    assert torch.equal(head_only.encoder.state_dict()[key], hub_cache[key])


def test_the_normalisation_layer_is_fixed_saved_and_uses_the_weights_statistics(hub_cache):
    model = build_named()
    layer = model.transform
    assert dict(layer.named_parameters()) == {}  # buffers: no optimiser moves them
    assert {"transform.mean", "transform.std"} <= set(model.state_dict())
    x = torch.rand(2, 1, 32, 32)
    expected = (x.repeat(1, 3, 1, 1) - torch.tensor(HUB_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(HUB_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    # A local file records no statistics: ImageNet's.
    imagenet = build_model(TrialConfig.from_dict({"encoder_weights": "x.pt"}),
                           load_encoder_weights=False).transform
    torch.testing.assert_close(imagenet.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_a_checkpoint_of_a_pretrained_model_loads_with_nothing_to_fetch(hub_cache, tmp_path,
                                                                         monkeypatch):
    from trainable.checkpoint import save_best
    from trainable.inference import Classifier

    model = build_named().eval()
    cfg = TrialConfig.from_dict({"encoder": ENCODER, "encoder_weights": "imagenet",
                                 "loss_set": "baseline", "device": "cpu"})
    save_best(tmp_path / "ckpt", model.state_dict(), cfg.to_dict(), {"image_size": 64})
    use_hub_cache(monkeypatch, tmp_path / "empty-hub")  # offline, and the weights gone
    classifier = Classifier.from_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(classifier.model.transform.std.flatten(), torch.tensor(HUB_STD))
    images = torch.rand(2, 64, 64)
    with torch.no_grad():
        expected = torch.sigmoid(model(images[:, None])[1]).numpy()
    torch.testing.assert_close(torch.from_numpy(classifier.probabilities(images.numpy())),
                               torch.from_numpy(expected), rtol=1e-4, atol=1e-5)


def test_a_weight_name_smp_does_not_offer_is_refused_at_the_door():
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict({"encoder_weights": "imagenett"})
    message = str(err.value)
    assert "\n" not in message
    assert "'encoder_weights' = 'imagenett'" in message and "(imagenet, advprop)" in message
    assert TrialConfig.from_dict({"encoder_weights": "advprop"}).encoder_weights == "advprop"
    assert TrialConfig.from_dict({"encoder_weights": "w.pt"}).encoder_weights == "w.pt"


# ---------------------------------------------------------------------------------------------
# The refusal when the weights cannot be had, and the default from the cache's origin

def assert_refusal(message: str, why: str) -> None:
    assert "\n" not in message.strip()
    for part in ("'encoder_weights' = 'imagenet'", "efficientnet-b0", why,
                 "encoder_weights=PATH", "HF_HOME or HF_HUB_CACHE", "encoder_weights=None"):
        assert part in message, part


def test_offline_without_the_files_refuses_in_one_line(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "empty-hub")
    with pytest.raises(WeightsUnavailable) as err:
        check_fetchable(ENCODER, "imagenet")
    assert_refusal(str(err.value), "HF_HUB_OFFLINE is set")
    # Not offline, but the Hub unreachable: one request, no retries, the reason in the line.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(url, **kwargs):
        assert kwargs["retry_on_errors"] is False
        raise ConnectionError("simulated: no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(WeightsUnavailable) as err:
        check_fetchable(ENCODER, "imagenet")
    assert_refusal(str(err.value), "the Hub is unreachable: simulated: no route")


@pytest.fixture
def real_cache(small_cache, tmp_path):
    """The small cache, its manifest saying it was prepared from the real release."""
    cache = tmp_path / "real-cache"
    shutil.copytree(small_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["synthetic"] = False
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return cache


def test_train_and_search_on_a_real_cache_default_to_imagenet_and_refuse_offline(
        real_cache, small_cache, tmp_path, monkeypatch, capsys):
    from trainable.data.cache import data_origin
    from trainable.pretrained import default_weights

    assert [default_weights(data_origin(c)) for c in (real_cache, small_cache)] == ["imagenet",
                                                                                  None]
    use_hub_cache(monkeypatch, tmp_path / "empty-hub")
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"cache={real_cache}", "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gazetune train: ") and err.count("\n") == 1
    assert_refusal(err, "HF_HUB_OFFLINE is set")
    assert main(["search", "--name", "offline", "--cache", str(real_cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gazetune search: ") and err.count("\n") == 1
    assert_refusal(err, "HF_HUB_OFFLINE is set")
    # Refused before anything started: no MLflow store, no Tune storage.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
