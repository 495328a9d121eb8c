"""Checkpoint folders, written atomically and read without unpickling arbitrary objects.

A trial's checkpoint folder holds:
    state.pt        everything needed to continue (model, optimiser, scheduler, RNG, epoch, best)
    best/model.pt   the weights of the best validation epoch so far
    best/config.json, best/metrics.json
Every file is written atomically (`trainable.files`): a process killed mid-write, or a write
that fails (disk full, quota), leaves the previous file intact; the three files of best/ move
into place together. All `torch.load` calls use weights_only=True. torch is imported only where
a checkpoint is saved or loaded.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from trainable import files
from trainable.errors import GazetuneError


def save_torch(obj, path: Path) -> None:
    files.atomic_write(path, lambda tmp: files.write_bytes(tmp, _torch_bytes(obj)))


def save_json(obj, path: Path) -> None:
    files.atomic_write(path, lambda tmp: tmp.write_text(_json(obj)))


def load_torch(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GazetuneError(f"checkpoint file {path} does not exist") from None
    # torch.load of a damaged file raises whatever its reader met (zip, unpickling, storage
    # errors): each is one line naming the file.
    except Exception as err:  # noqa: BLE001
        raise GazetuneError(f"checkpoint file {path} cannot be read: {err}") from None


def save_best(folder: Path, model_state: dict, config: dict, metrics: dict) -> None:
    """Replace best/ as a whole: a failed write keeps the previous best epoch's three files."""
    best = Path(folder) / "best"
    model = _torch_bytes(model_state)
    files.atomic_write_all({
        best / "model.pt": lambda tmp: files.write_bytes(tmp, model),
        best / "config.json": lambda tmp: tmp.write_text(_json(config)),
        # Moved into place last: its presence marks a complete best/.
        best / "metrics.json": lambda tmp: tmp.write_text(_json(metrics)),
    })


# Where an MLflow model of the best checkpoint (`gazetune export --register`) keeps its files.
MODEL_CHECKPOINT = "artifacts/checkpoint"


def load_best(folder: Path) -> tuple[dict, dict, dict]:
    """(model state dict, config dict, metrics dict) of a checkpoint's best epoch.

    `folder` is a trial's checkpoint folder (holding `best/`), the best files' own folder, e.g.
    the `checkpoint/` artifact downloaded from MLflow, or a downloaded MLflow model of the best
    checkpoint (holding `artifacts/checkpoint/`, e.g. `mlflow.artifacts.download_artifacts(
    "models:/NAME/1")`).

    Raises:
        GazetuneError: no complete best checkpoint there, or a file that cannot be read; the
            message names it.
    """
    folder = Path(folder)
    best = next((f for f in (folder / "best", folder / MODEL_CHECKPOINT) if f.is_dir()), folder)
    if not all((best / name).is_file() for name in ("model.pt", "config.json", "metrics.json")):
        raise GazetuneError(f"{folder} holds no complete best checkpoint (model.pt, config.json "
                            f"and metrics.json, or a best/ or {MODEL_CHECKPOINT}/ folder of them)")
    documents = []
    for name in ("config.json", "metrics.json"):
        try:
            document = json.loads((best / name).read_text())
        except (OSError, ValueError) as err:
            raise GazetuneError(f"{best / name}: unreadable ({err})") from None
        if not isinstance(document, dict):
            raise GazetuneError(f"{best / name}: a JSON object is expected")
        documents.append(document)
    return load_torch(best / "model.pt"), *documents


def _torch_bytes(obj) -> memoryview:
    """`torch.save` into memory; the caller writes the bytes.

    torch's own file writer reports a full disk as "RuntimeError: [enforce fail ...]
    unexpected pos", losing the reason; a plain write raises the OSError that names it.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
