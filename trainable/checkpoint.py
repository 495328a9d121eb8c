"""Checkpoint folders, written atomically and read without unpickling arbitrary objects.

A trial's checkpoint folder holds:
    state.pt        everything needed to continue (model, optimiser, scheduler, RNG, epoch, best)
    best/model.pt   the weights of the best validation epoch so far
    best/config.json, best/metrics.json
Each file is written to a temporary name in the same folder and moved into place, so a process
killed mid-write leaves the previous file intact. All `torch.load` calls use weights_only=True.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from trainable.errors import GazetuneError


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then move the file to `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True)))


def load_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GazetuneError(f"checkpoint file {path} does not exist") from None
    except Exception as err:
        raise GazetuneError(f"checkpoint file {path} cannot be read: {err}") from None


def save_best(folder: Path, model_state: dict, config: dict, metrics: dict) -> None:
    best = Path(folder) / "best"
    save_torch(model_state, best / "model.pt")
    save_json(config, best / "config.json")
    save_json(metrics, best / "metrics.json")  # last: its presence marks a complete best/


def load_best(folder: Path) -> tuple[dict, dict, dict]:
    """(model state dict, config dict, metrics dict) of a checkpoint folder's best epoch."""
    best = Path(folder) / "best"
    if not (best / "metrics.json").is_file():
        raise GazetuneError(f"{best} holds no complete best checkpoint")
    config = json.loads((best / "config.json").read_text())
    metrics = json.loads((best / "metrics.json").read_text())
    return load_torch(best / "model.pt"), config, metrics
