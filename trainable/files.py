"""Writing files in place, atomically: the project's one way to write a file.

Each file is written to a temporary name in its own folder and moved into place, so a process
killed mid-write, or a write that fails (disk full, quota), leaves the previous file intact;
`atomic_write_all` moves several files into place together. Checkpoints, the data cache,
figures and reports all write through here. Standard library only.
"""

from __future__ import annotations

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


# One write() of tens of MB is 20-40 times slower than the same bytes in 1 MiB writes on the
# machines this project is tested on (75 MB, a checkpoint's state.pt: 1.1-1.4 s against
# 0.03-0.07 s), and a trial writes its checkpoint every epoch.
_CHUNK = 1 << 20


def write_bytes(path: str | Path, data: bytes) -> None:
    """`Path(path).write_bytes(data)`, in 1 MiB writes."""
    view = memoryview(data)
    with open(path, "wb") as file:
        file.writelines(view[start : start + _CHUNK] for start in range(0, len(view), _CHUNK))


def opened(write: Callable) -> Callable[[Path], None]:
    """`write(file)`, given an open binary file, as a writer of a temporary path for
    `atomic_write`: np.savez given a file name not ending in .npz would write to that name
    plus .npz."""

    def to_path(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            write(file)

    return to_path


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
