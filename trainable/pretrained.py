"""Pretrained encoder weights by name (`encoder_weights=imagenet`), loaded by smp itself.

smp 0.6 keeps, per encoder, the weight names it offers (`pretrained_settings`), each a Hugging
Face repository at a pinned revision. `smp.Unet(..., encoder_weights=NAME)` downloads its
`config.json` (the input statistics) and `model.safetensors` (about 20 MB for efficientnet-b0)
with `huggingface_hub.hf_hub_download` into the Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`);
a file already there at that revision is used without any network. This module names the
weights, tells whether they can be had before any work starts, and gives the normalisation
they were trained with. Imports of smp and huggingface_hub are local: they are slow.
"""

from __future__ import annotations

from pathlib import Path

from trainable.errors import GazetuneError

# What `smp.encoders.get_encoder` downloads for named weights, in its order.
HUB_FILES = ("config.json", "model.safetensors")
# The statistics of ImageNet-trained weights, assumed for a local weights file (which records
# none) and the placeholder of a model built to receive a checkpoint (which holds the real ones).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(GazetuneError):
    """Named encoder weights that are neither in the Hugging Face cache nor fetchable."""


def weight_names(encoder: str) -> tuple[str, ...]:
    """The weight names smp offers for `encoder` (efficientnet-b0: imagenet, advprop).

    `tu-` encoders (and the `timm-` ones smp turns into them) take their weights from timm by
    the encoder's name instead, so smp names none for them.
    """
    import segmentation_models_pytorch as smp

    if encoder.startswith("tu-") or smp.encoders.is_equivalent_to_timm_universal(encoder):
        return ()
    entry = smp.encoders.encoders.get(encoder, {})
    return tuple(entry.get("pretrained_settings", {}))


def is_named(encoder: str, weights: str | None) -> bool:
    """Whether `weights` is a weight name of `encoder` (else None or a local file)."""
    return weights is not None and weights in weight_names(encoder)


def hub_location(encoder: str, weights: str) -> tuple[str, str]:
    """(repository, revision) smp downloads the named weights from."""
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders[encoder]["pretrained_settings"][weights]
    return settings["repo_id"], settings["revision"]


def check_available(encoder: str, weights: str | None, local: bool = True) -> None:
    """Refuse encoder weights that no trial could load, before any starts: named weights
    neither in the Hugging Face cache nor fetchable (`check_fetchable`), or, with `local`, a
    weights file that does not exist here."""
    if is_named(encoder, weights):
        check_fetchable(encoder, weights)
    elif weights is not None and local and not Path(weights).is_file():
        raise GazetuneError(f"config key 'encoder_weights': no such file {weights}")


def check_fetchable(encoder: str, weights: str, timeout: float = 10.0) -> None:
    """Refuse named weights that smp could not load here, in one line with the ways out.

    Files in the Hugging Face cache at smp's revision pass without network. Otherwise one HEAD
    request per missing file, without retries (huggingface_hub's own download retries for about
    20 s before it gives up), says whether the Hub is reachable; nothing is downloaded here.

    Raises:
        WeightsUnavailable: offline mode (`HF_HUB_OFFLINE`) or the Hub unreachable, and the
            files not in the cache.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    repo, revision = hub_location(encoder, weights)
    missing = [name for name in HUB_FILES
               if not isinstance(try_to_load_from_cache(repo, name, revision=revision), str)]
    if not missing:
        return
    if constants.is_offline_mode():
        why = "HF_HUB_OFFLINE is set"
    else:
        try:
            for name in missing:
                get_hf_file_metadata(hf_hub_url(repo, name, revision=revision),
                                     timeout=timeout, retry_on_errors=False)
            return  # reachable: smp downloads them when the model is built
        except Exception as err:  # noqa: BLE001  (DNS, proxy, HTTP status: all mean "not here")
            why = f"the Hub is unreachable: {' '.join(str(err).split())[:200]}"
    raise WeightsUnavailable(
        f"config key 'encoder_weights' = {weights!r}: smp's weights for {encoder} could not be "
        f"fetched ({repo} {'/'.join(missing)} at revision {revision[:12]} are not in the "
        f"Hugging Face cache {constants.HF_HUB_CACHE}, and {why}): pass a local weights file "
        f"(encoder_weights=PATH), point HF_HOME or HF_HUB_CACHE at a cache filled where the Hub "
        f"is reachable, or train from random weights (encoder_weights=None)")


def input_statistics(encoder: str, weights: str) -> tuple[list[float], list[float]]:
    """(mean, std) per RGB channel for inputs in [0, 1], as the named weights were trained.

    smp reads them from the weights' `config.json` (`get_preprocessing_params`); a model that
    expects inputs in [0, 255] gets them divided by 255, since the project's images are in
    [0, 1]: (255 x - m) / s = (x - m / 255) / (s / 255).
    """
    import segmentation_models_pytorch as smp

    params = smp.encoders.get_preprocessing_params(encoder, pretrained=weights)
    scale = float(params["input_range"][1])
    return ([m / scale for m in params["mean"]], [s / scale for s in params["std"]])


def with_default_weights(config: dict, origin: str, encoder: str) -> dict:
    """`config` (trial settings, possibly partial) with `encoder_weights` set to its default for
    the cache's `origin` and `encoder` (`default_weights`) when it gives none; unchanged when
    that default is None, the trainable's own. Used by a search (on its fixed settings) and by
    `gazetune train`."""
    if "encoder_weights" in config:
        return config
    weights = default_weights(origin, encoder)
    return config if weights is None else {**config, "encoder_weights": weights}


def default_weights(origin: str, encoder: str = "efficientnet-b0") -> str | None:
    """The `encoder_weights` a search or `gazetune train` uses when none is given, from the
    cache's origin (`trainable.data.cache.data_origin`): `imagenet` for the real release (the
    paper's and the dataset authors' start), None for a synthetic cache (or one of unknown
    origin), which pretrained weights would not help and whose demo and tests run offline."""
    return "imagenet" if origin == "real" and "imagenet" in weight_names(encoder) else None
