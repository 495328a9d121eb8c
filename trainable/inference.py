"""A best checkpoint as a classifier of new radiographs: probabilities and saliency maps.

What the MLflow model of `gazetune export --register` (`search/mlflow_model.py`) and `gazetune
predict` run. The network is rebuilt from the checkpoint's config and its weights loaded with
`torch.load(weights_only=True)` (`trainable.checkpoint.load_best`); inference is evaluation's own
(`trainable.loop.predict_batches`: eval mode, the config's batch size, sigmoid outputs), so the
probabilities of the cache's test images are the ones `gazetune evaluate` scores.

Images are what `gazetune prepare` makes of a DICOM (`trainable.data.cache.read_model_input`):
float32 in [0, 1], [N, S, S] at the trial's image size S.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainable.config import TrialConfig
from trainable.errors import GazetuneError


class Classifier:
    """The network of a best checkpoint, on the device its config asks for (CPU without CUDA).

    Attributes:
        cfg: the trial's config. image_size: S, the side of the images it takes.
        metrics: the best epoch's metrics (metrics.json).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrialConfig, image_size: int,
                 metrics: dict | None = None):
        from trainable.loop import choose_device

        self.cfg, self.image_size, self.metrics = cfg, image_size, dict(metrics or {})
        self.device = choose_device(cfg)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, folder: str | Path, image_size: int | None = None) -> Classifier:
        """The classifier of a checkpoint folder (anything `load_best` reads).

        Args:
            folder: the checkpoint.
            image_size: the trial's image size, for a checkpoint whose metrics.json does not
                record it (written before it did).

        Raises:
            GazetuneError: no readable checkpoint, no image size, or weights that do not fit the
                config's network; one line naming the folder.
        """
        from trainable.checkpoint import load_best
        from trainable.model import build_model

        state, config, metrics = load_best(Path(folder))
        size = image_size or metrics.get("image_size")
        if size is None:
            raise GazetuneError(f"checkpoint {folder}: metrics.json records no image_size (a "
                                f"checkpoint from before it did): pass image_size, the size of "
                                f"the cache it trained on")
        if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
            raise GazetuneError(f"checkpoint {folder}: image size {size!r} (metrics.json's "
                                f"image_size): an integer in [8, 4096] is expected")
        device = config.get("device", "auto")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # trained on a GPU, used where there is none
        cfg = TrialConfig.from_dict({**config, "device": device, "checkpoint_dir": None,
                                     # the trial's share of a packed GPU; inference runs alone
                                     "gpu_memory_fraction": 0.0})
        model = build_model(cfg, load_encoder_weights=False)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise GazetuneError(f"checkpoint {folder} does not fit the model of its config: "
                                f"{first}") from None
        return cls(model, cfg, size, metrics)

    def check_images(self, images) -> np.ndarray:
        """`images` as float32 [N, S, S], or a one-line `GazetuneError` saying what is expected.

        Accepts any real array-like of that shape with values in [0, 1]; a single [S, S] image
        is refused (the first axis counts images).
        """
        s = self.image_size
        expected = (f"a float32 array of shape (N, {s}, {s}) with values in [0, 1] "
                    f"(gazetune prepare's images at this model's size, {s} px)")
        try:
            array = np.asarray(images)
        except (TypeError, ValueError) as err:
            raise GazetuneError(f"images: expected {expected}; got something that is no "
                                f"array ({err})") from None
        if array.dtype.kind not in "fiu" or array.ndim != 3 or array.shape[1:] != (s, s) \
                or len(array) == 0:
            raise GazetuneError(f"images: expected {expected}; got {array.dtype} of shape "
                                f"{array.shape}")
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise GazetuneError(f"images: expected {expected}; got values outside [0, 1] "
                                f"(range {np.nanmin(array):g} to {np.nanmax(array):g})")
        return array

    def predict(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        """(class probabilities [N, 3] in CLASS_NAMES order, mask probabilities [N, S, S] or
        None for a model without a decoder); the probabilities are independent sigmoids."""
        from trainable.loop import predict_batches

        x = self.check_images(images)
        return predict_batches(self.model, self._batches(x), self.cfg, self.device)

    def probabilities(self, images) -> np.ndarray:
        """Class probabilities [N, 3] (Normal, CHF, pneumonia), one-vs-rest sigmoids."""
        return self.predict(images)[0]

    def saliency(self, images, target: np.ndarray | None = None) -> np.ndarray:
        """|map| of the config's generator summed over channels, [N, S, S], for the class
        `target` of each image (default: the class of highest probability)."""
        from trainable.loop import explain_batches

        x = self.check_images(images)
        if target is None:
            target = self.probabilities(x).argmax(1)
        target = torch.as_tensor(np.asarray(target), dtype=torch.long)
        bs = self.cfg.batch_size
        batches = ((b, target[i:i + bs].to(self.device))
                   for i, b in zip(range(0, len(x), bs), self._batches(x)))
        return explain_batches(self.model, batches, self.cfg, self.device)

    def _batches(self, x: np.ndarray):
        bs = self.cfg.batch_size
        for start in range(0, len(x), bs):
            yield torch.from_numpy(x[start:start + bs]).unsqueeze(1).to(self.device)

