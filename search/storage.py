"""Files of a search: in a local folder or behind a URI (s3://, gs://, ...), as Tune's storage is.

The service keeps its settings beside Tune's state, wherever that lives; pyarrow's filesystems
(a Ray dependency) reach the URIs, and a local file is written atomically.
"""

from __future__ import annotations

from pathlib import Path

from trainable.files import atomic_write


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def absolute(path: str | Path, workdir: Path) -> Path:
    """`path` with `~` expanded, taken from `workdir` when relative."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (workdir / path).absolute()


def located(location: str, workdir: Path) -> str:
    """A URI as given, a local path made absolute from `workdir`."""
    return location if is_uri(location) else str(absolute(location, workdir))


def write_text(location: str, text: str) -> None:
    """Write a whole file in one step: a killed writer leaves the previous content."""
    if is_uri(location):
        import pyarrow.fs

        write_text_on(*pyarrow.fs.FileSystem.from_uri(location), text)
        return
    atomic_write(Path(location), lambda tmp: tmp.write_text(text))


def read_text(location: str) -> str:
    if is_uri(location):
        import pyarrow.fs

        return read_text_on(*pyarrow.fs.FileSystem.from_uri(location))
    return Path(location).read_text()


def read_text_on(filesystem, path: str) -> str:
    """A file on a pyarrow filesystem (as Tune names a trial's storage)."""
    import pyarrow.fs

    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(path)
    with filesystem.open_input_stream(path) as src:
        return src.readall().decode()


def write_text_on(filesystem, path: str, text: str) -> None:
    with filesystem.open_output_stream(path) as out:  # one object written at once
        out.write(text.encode())


def remove(location: str) -> None:
    """Remove a file this search wrote, if it is there."""
    if is_uri(location):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(path)
        return
    Path(location).unlink(missing_ok=True)


def exists(location: str) -> bool:
    try:
        read_text(location)
    except (FileNotFoundError, NotADirectoryError):  # e.g. a storage path under a file
        return False
    return True
