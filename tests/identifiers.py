"""Find patient, study and DICOM identifiers in whatever a run wrote.

`scan_for_identifiers(paths, identifiers)` reads every file under `paths` as a curious reader
could: the raw bytes, and what they hold once unpacked: compressed zip members (`.npz`,
checkpoints), gzip streams, compressed PNG text chunks, SQLite databases (every table dumped as
SQL text) and JSON with escaped characters. Each view is searched for each identifier encoded as
UTF-8, UTF-16 and UTF-32 (numpy stores unicode arrays as UTF-32), ASCII case ignored. An
identifier that starts or ends with a digit counts only where no digit touches it, so that a
timestamp or a float that happens to contain a patient number is not a finding.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sqlite3
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

ENCODINGS = ("utf-8", "utf-16-le", "utf-32-le")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_DEPTH = 3  # archives inside archives


def scan_for_identifiers(
    paths: Iterable[str | Path], identifiers: Iterable[str]
) -> list[tuple[Path, str]]:
    """Every (file, identifier) such that the file holds the identifier in some form.

    Args:
        paths: files or folders (searched recursively, hidden files included).
        identifiers: the strings to look for (dicom_id, patient_id, study_id values).

    Returns:
        Sorted, without repeats; empty when nothing was found.
    """
    identifiers = sorted({i for i in identifiers if i}, key=len, reverse=True)
    if not identifiers:
        return []
    needles = {encoding: [_Needle(i, encoding) for i in identifiers] for encoding in ENCODINGS}
    # One pass of all identifiers at once tells whether any of them is there at all (they
    # rarely are); only then is each one checked with its digit-boundary rule.
    anything = {encoding: re.compile(_trie_pattern([n.text for n in encoded]))
                for encoding, encoded in needles.items()}
    found = set()
    for file in _files(paths):
        for view in _views(file.read_bytes()):
            view = view.lower()
            for encoding, encoded in needles.items():
                if anything[encoding].search(view):
                    found.update((file, n.identifier) for n in encoded if n.occurs_in(view))
    return sorted(found)


def _trie_pattern(words: list[bytes]) -> bytes:
    """A regular expression that matches where any of `words` starts, its alternatives nested
    by common prefix. Python's `re` tries the branches of a flat alternation one by one at every
    position; with ~1,600 identifiers that made the scan of a demo's output take 110 s, the
    nested form a few (measured on the 2-core machine)."""
    trie: dict = {}
    for word in words:
        node = trie
        for byte in word:
            node = node.setdefault(byte, {})
        node[None] = {}  # a word ends here

    def emit(node: dict) -> bytes:
        branches = [re.escape(bytes([byte])) + emit(child)
                    for byte, child in sorted((k, v) for k, v in node.items() if k is not None)]
        if not branches:
            return b""
        if None in node:  # a word ends here: what follows may match, need not
            return b"(?:" + b"|".join(branches) + b")?"
        return branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"

    return emit(trie)


class _Needle:
    """One identifier in one encoding, lower-cased, with its digit-boundary rule."""

    def __init__(self, identifier: str, encoding: str):
        self.identifier = identifier
        self.text = identifier.lower().encode(encoding)
        self.digits = [d.encode(encoding) for d in "0123456789"]
        self.unit = len(self.digits[0])  # bytes per character (ASCII) in this encoding
        self.check_before = identifier[0].isdigit()
        self.check_after = identifier[-1].isdigit()

    def occurs_in(self, data: bytes) -> bool:
        start = data.find(self.text)
        while start >= 0:
            end = start + len(self.text)
            before = data[start - self.unit:start] if start >= self.unit else b""
            after = data[end:end + self.unit]
            if not ((self.check_before and before in self.digits)
                    or (self.check_after and after in self.digits)):
                return True
            start = data.find(self.text, start + 1)
        return False


def _files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for path in map(Path, paths):
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())


def _views(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """The bytes, then whatever they hold in unpacked form. A zip archive is read member by
    member instead of as raw bytes (see `_zip_members`)."""
    if data.startswith(b"PK\x03\x04") and depth < MAX_DEPTH:
        try:
            members = _zip_members(data)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
            members = None  # not a zip after all: searched as raw bytes below
        if members is not None:
            for inner in members:
                yield from _views(inner, depth + 1)
            return
    yield data
    if depth >= MAX_DEPTH:
        return
    unpacked: list[bytes] = []
    try:
        if data.startswith(b"PK\x03\x04"):
            unpacked = _zip_members(data)
        elif data.startswith(b"\x1f\x8b"):
            unpacked = [gzip.decompress(data)]
        elif data.startswith(PNG_SIGNATURE):
            unpacked = _png_texts(data)
        elif data.startswith(SQLITE_MAGIC):
            unpacked = [_sqlite_dump(data)]
        elif data.lstrip()[:1] in (b"{", b"["):
            # ensure_ascii=False turns "\u0031..." escapes back into the characters.
            unpacked = [json.dumps(json.loads(data), ensure_ascii=False).encode()]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, sqlite3.Error):
        return  # not what its first bytes suggested: the raw bytes were searched already
    for inner in unpacked:
        yield from _views(inner, depth + 1)


# A torch checkpoint's tensor storages: raw numbers, gigabytes across a search's checkpoints.
_TENSOR_STORAGE = re.compile(r"(^|/)data/\d+$")


def _zip_members(data: bytes) -> list[bytes]:
    """The member names, then every member but torch tensor storages (`<archive>/data/<n>`):
    the pickled structure, config and metrics beside them are searched; the weights, which
    cannot hold an identifier as text, are not (they made a demo's scan take many minutes)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        names = "\n".join(info.filename for info in infos).encode()
        return [names] + [archive.read(info) for info in infos
                          if not _TENSOR_STORAGE.search(info.filename)]


def _png_texts(data: bytes) -> list[bytes]:
    """The decompressed text of zTXt chunks and compressed iTXt chunks (tEXt is plain)."""
    texts, position = [], len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        position += 12 + length  # length, type, body, CRC
        if kind == b"zTXt":
            keyword, _, rest = body.partition(b"\x00")
            texts.append(keyword + b" " + zlib.decompress(rest[1:]))
        elif kind == b"iTXt":
            keyword, _, rest = body.partition(b"\x00")
            compressed, text = rest[0], rest[2:].split(b"\x00", 2)[-1]
            texts.append(keyword + b" " + (zlib.decompress(text) if compressed else text))
    return texts


def _sqlite_dump(data: bytes) -> bytes:
    """Every table of a SQLite database as SQL text: a long value that the file splits over
    overflow pages comes out whole."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.deserialize(data)
        return "\n".join(connection.iterdump()).encode()
    finally:
        connection.close()
