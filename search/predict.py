"""`gazetune predict MODEL_URI FILE.dcm...`: a logged model's probabilities for new radiographs.

Each DICOM is decoded and resized exactly as `gazetune prepare` does it
(`trainable.data.cache.read_model_input`), at the model's image size; the model is loaded through
`search.tracking.load_model` (`mlflow.pyfunc.load_model`, with the bounded retries) and its
`predict` gives one-vs-rest probabilities of Normal, CHF and pneumonia (independent sigmoids:
they need not sum to 1). Files are named as the user gave them; nothing from a DICOM header is
printed or written. `--saliency FOLDER` draws one panel per image: the input, the map of the
trial's generator for the predicted class and, for a model with a decoder, its mask.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search import tracking
from search.storage import is_uri
from trainable.config import CLASS_NAMES
from trainable.errors import GazetuneError


@dataclass(frozen=True)
class Prediction:
    file: str  # as given on the command line
    probabilities: dict[str, float]  # {class: probability}
    panel: Path | None = None  # the saliency panel written for it


def predict_files(model_uri: str, files: list[str], out: str | Path | None = None,
                  saliency: str | Path | None = None,
                  tracking_uri: str | None = None) -> list[Prediction]:
    """Probabilities of each DICOM in `files`: printed as a table, or written to CSV `out`.

    Relative paths are taken from the current directory, and `models:/` and `runs:/` URIs
    refer to the MLflow store of `tracking_uri` (default: `./mlflow.db`).

    Every input is checked before the model is loaded: each file must decode (`read_dicom`),
    `out`'s folder and `saliency` must be writable.

    Raises:
        GazetuneError: a file that is not a usable DICOM, an unwritable output, a model URI
            that holds no model of this project; one line naming it.
    """
    from trainable.data.cache import read_model_input
    from trainable.data.dicom import read_dicom
    from trainable.files import check_writable

    if not files:
        raise GazetuneError("predict: no DICOM file given")
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise GazetuneError(f"--out {out}: a folder; give a file name for the CSV")
        check_writable(out.parent, "--out folder")
    if saliency is not None:
        saliency = check_writable(saliency, "--saliency folder")
    for file in files:  # before the model is loaded; a DataError names the file as given
        read_dicom(file)

    classifier = _load(model_uri, tracking_uri)
    # Decoded again rather than kept: a radiograph is tens of MB at full size.
    images = np.stack([read_model_input(f, classifier.image_size) for f in files])
    images = images.astype(np.float32)
    probs = classifier.probabilities(images)
    panels = (_draw_panels(classifier, images, probs, files, Path(saliency)) if saliency
              else [None] * len(files))
    results = [Prediction(f, dict(zip(CLASS_NAMES, map(float, p), strict=True)), panel)
               for f, p, panel in zip(files, probs, panels, strict=True)]
    if out is not None:
        _write_csv(results, out)
        print(f"probabilities of {len(results)} image(s) written to {out}")
    else:
        print(table(results))
    for result in results:
        if result.panel is not None:
            print(f"saliency panel of {result.file}: {result.panel}")
    return results


def table(results: list[Prediction]) -> str:
    """file | Normal | CHF | pneumonia, four decimals."""
    width = max(len("file"), *(len(r.file) for r in results))
    lines = [f"{'file':<{width}}  " + "  ".join(f"{c:>9}" for c in CLASS_NAMES)]
    for r in results:
        lines.append(f"{r.file:<{width}}  "
                     + "  ".join(f"{r.probabilities[c]:>9.4f}" for c in CLASS_NAMES))
    return "\n".join(lines)


def _load(model_uri: str, tracking_uri: str | None):
    """The pyfunc model, with the `Classifier` inside it for the saliency maps."""
    store = tracking_uri
    if is_uri(model_uri) or model_uri.startswith(("models:", "runs:")):  # else: a folder
        store = tracking.existing_store(tracking.resolve_tracking_uri(tracking_uri, Path.cwd()))
    model = tracking.load_model(model_uri, store)
    try:
        classifier = getattr(model.unwrap_python_model(), "classifier", None)
    except Exception:  # noqa: BLE001  (MLflow refuses to unwrap a model of another flavour)
        classifier = None
    if classifier is None:
        raise GazetuneError(f"model {model_uri}: not a model of `gazetune export --register` "
                            f"(no gazetune classifier inside)")
    return _PyfuncClassifier(model, classifier)


class _PyfuncClassifier:
    """Probabilities through the pyfunc model's own `predict` (its signature checks included);
    saliency maps from the classifier inside it."""

    def __init__(self, model, classifier):
        self.model, self.classifier = model, classifier
        self.image_size = classifier.image_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        frame = self.model.predict(self.classifier.check_images(images))
        return frame[list(CLASS_NAMES)].to_numpy(dtype=np.float64)

    def saliency(self, images: np.ndarray, target: np.ndarray) -> np.ndarray:
        return self.classifier.saliency(images, target)

    def masks(self, images: np.ndarray) -> np.ndarray | None:
        return self.classifier.predict(images)[1]


def _draw_panels(classifier, images: np.ndarray, probs: np.ndarray, files: list[str],
                 folder: Path) -> list[Path]:
    """One PNG per image: input | generator map | gaze (n/a: a new image has none) | mask."""
    from trainable.figures import heatmap_panels, save_figure

    target = probs.argmax(1)
    maps = classifier.saliency(images, target)
    masks = classifier.masks(images)
    paths, used = [], set()
    for i, file in enumerate(files):
        stem = Path(file).stem or f"image{i + 1}"
        name, n = f"{stem}_saliency.png", 1
        while name in used:  # two inputs of one name in different folders
            n += 1
            name = f"{stem}-{n}_saliency.png"
        used.add(name)
        c = int(target[i])
        fig = heatmap_panels(images[i:i + 1], maps[i:i + 1], None,
                             None if masks is None else masks[i:i + 1],
                             titles=[f"predicted {CLASS_NAMES[c]} (p={probs[i, c]:.2f})"])
        paths.append(save_figure(fig, folder / name))
    return paths


def _write_csv(results: list[Prediction], path: Path) -> None:
    from trainable.files import atomic_write

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", *CLASS_NAMES])
    for r in results:
        writer.writerow([r.file, *(repr(r.probabilities[c]) for c in CLASS_NAMES)])
    text = buffer.getvalue()
    atomic_write(path, lambda tmp: tmp.write_text(text))

