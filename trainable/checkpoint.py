"""Checkpoint folders, written atomically and read without unpickling arbitrary objects.

A trial's checkpoint folder holds:
    state.pt        everything needed to continue (model, optimiser, scheduler, RNG, epoch, best)
    best/model.pt   the weights of the best validation epoch so far
    best/config.json, best/metrics.json
Each file is written to a temporary name in the same folder and moved into place, so a process
killed mid-write, or a write that fails (disk full, quota), leaves the previous file intact;
the three files of best/ move into place together. All `torch.load` calls use weights_only=True.

`atomic_write` is the project's one way to write a file in place (the data cache, figures and
reports use it too);
torch is imported only where a checkpoint is saved or loaded, so data preparation stays light.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path

from trainable.errors import GazetuneError

_TEMPORARY = re.compile(r"\..+\.(?P<pid>\d+)\.[0-9a-f]+\.tmp")  # atomic_write_all's names


class WriteError(GazetuneError):
    """A file or folder that cannot be written (disk full, read-only, not a folder); the
    message names it and gives the operating system's reason."""


def check_writable(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and prove that a file can be written and removed there.

    Run before any long work, so an unusable folder is refused at once instead of after hours
    of decoding or training.

    Args:
        folder: the folder to probe.
        what: what the folder is for, for the message (e.g. "cache folder").

    Raises:
        WriteError: naming the folder and the operating system's reason.
    """
    folder = Path(folder)
    probe = folder / f".gazetune-probe-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "xb") as file:
            file.write(b"probe")  # a few bytes: creating an empty file can succeed on a full disk
        probe.unlink()
    except OSError as err:
        with suppress(OSError):  # the probe may never have been created
            probe.unlink()
        raise WriteError(f"{what} {folder} is not writable: {_reason(err)}") from None
    return folder


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, then move the file to `path` in one step.

    Raises:
        WriteError: the file cannot be written (its folder cannot be created, the disk is
            full, ...): it names `path`; the previous file, if any, is left as it was.
    """
    atomic_write_all({Path(path): write})


def atomic_write_all(writes: Mapping[Path, Callable[[Path], object]]) -> None:
    """Write several files each to a temporary name, then move them all into place.

    A failure while writing (the likely moment for a full disk) leaves every target as it was:
    nothing is replaced until every file is written, and a rename needs no new space.

    Raises:
        WriteError: naming the file that could not be written.
    """
    temporary: dict[Path, Path] = {}
    path = None
    try:
        for path, write in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            # A unique name opened with O_EXCL, created as open() creates files (the umask
            # applies), unlike mkstemp's owner-only 0600: caches, checkpoints and reports are
            # shared. The writer's pid in the name lets a later run remove what a killed
            # writer left (`remove_stale_temporaries`).
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            open(tmp, "xb").close()
            temporary[path] = tmp
            write(tmp)
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    except OSError as err:
        _remove(temporary.values())
        raise WriteError(f"cannot write {path}: {_reason(err)}") from err
    except BaseException:
        _remove(temporary.values())
        raise


def remove_stale_temporaries(*folders: str | Path) -> None:
    """Delete the temporary files in `folders` that `atomic_write` left when its process was
    killed: only names `.<name>.<pid>.<hex>.tmp` whose writer no longer runs on this machine,
    so a writer running beside this one keeps its own. Only the folders named, not below them:
    a caller names the folders it writes to and never touches anything else. The pid says
    nothing about other machines: two machines must not write into one shared folder at once.
    """
    for folder in folders:
        for tmp in Path(folder).glob(".*.tmp"):
            writer = _TEMPORARY.fullmatch(tmp.name)
            if writer and tmp.is_file() and not _running(int(writer["pid"])):
                tmp.unlink(missing_ok=True)


def save_torch(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(_torch_bytes(obj)))


def save_json(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(_json(obj)))


def load_torch(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GazetuneError(f"checkpoint file {path} does not exist") from None
    except Exception as err:
        raise GazetuneError(f"checkpoint file {path} cannot be read: {err}") from None


def save_best(folder: Path, model_state: dict, config: dict, metrics: dict) -> None:
    """Replace best/ as a whole: a failed write keeps the previous best epoch's three files."""
    best = Path(folder) / "best"
    model = _torch_bytes(model_state)
    atomic_write_all({
        best / "model.pt": lambda tmp: tmp.write_bytes(model),
        best / "config.json": lambda tmp: tmp.write_text(_json(config)),
        # Moved into place last: its presence marks a complete best/.
        best / "metrics.json": lambda tmp: tmp.write_text(_json(metrics)),
    })


def load_best(folder: Path) -> tuple[dict, dict, dict]:
    """(model state dict, config dict, metrics dict) of a checkpoint's best epoch.

    `folder` is a trial's checkpoint folder (holding `best/`) or the best files' own folder,
    e.g. the `checkpoint/` artifact downloaded from MLflow.

    Raises:
        GazetuneError: no complete best checkpoint there, or a file that cannot be read; the
            message names it.
    """
    folder = Path(folder)
    best = folder / "best" if (folder / "best").is_dir() else folder
    if not all((best / name).is_file() for name in ("model.pt", "config.json", "metrics.json")):
        raise GazetuneError(f"{folder} holds no complete best checkpoint (model.pt, config.json "
                            f"and metrics.json, or a best/ folder of them)")
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


def _reason(err: OSError) -> str:
    if isinstance(err, FileExistsError):  # mkdir's "File exists" for a file in the way
        return f"{err.filename} is a file, not a folder"
    return err.strerror or str(err)


def _remove(paths) -> None:
    for tmp in paths:
        tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
