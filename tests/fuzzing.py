"""The machinery of the readers' fuzzing, shared by tests/test_fuzz.py and
benchmarks/fuzz_readers.py: the seeds, the DICOM and table mutations (hypothesis strategies of
cases), the judges that run one input through a reader, the `Sandbox` child process that judges
inputs one at a time with a time and memory limit, and the `Workspace` that ties them together.

A module of its own, not part of helpers.py: the sandbox's child process (spawned) imports the
module that defines it, and must not load torch, whose libraries alone take most of the child's
4 GiB address-space limit. tests/test_fuzz.py says what property the fuzzing checks.
"""

from __future__ import annotations

import copy
import csv
import io
import multiprocessing
import os
import re
import resource
import signal
import struct
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.tag import Tag

from trainable.data import read_dicom, read_release
from trainable.errors import DataError

# ---------------------------------------------------------------------------------------------
# Seeds: what the mutations start from

# Small public files: every transfer syntax the readers meet, both byte orders, both VRs.
PUBLIC_SMALL = (
    "CT_small.dcm",  # rescale intercept, no window
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "JPEG-LL.dcm",  # JPEG lossless, 1024 x 256
    "JPEGLSNearLossless_08.dcm",
    "vlut_04.dcm",  # a VOI LUT sequence
    "mlut_18.dcm",  # a modality LUT sequence
)
# The real chest radiograph (MONOCHROME1, 15 bits) at full size: 1-3 s a decode here, so only
# the benchmark uses it; the suite uses a 256-pixel crop of it with the same header.
PUBLIC_FULL = ("RG1_UNCR.dcm", "RG1_J2KR.dcm")
RG1_CROPS = ("RG1 crop", "RG1 crop J2K")
SYNTHETIC = tuple(f"synthetic {i}" for i in range(4))
DICOM_SEEDS = PUBLIC_SMALL + RG1_CROPS + SYNTHETIC
TABLES = ("master_sheet.csv", "fixations.csv", "filenames.csv")


def public(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not installed (pydicom-data is a test dependency)"
    return Path(path)


def make_release(folder: Path, n_images: int = 9) -> Path:
    """A synthetic release under `folder` (EGD-CXR tables and MIMIC-CXR DICOMs)."""
    from synthetic.release import synthesize

    synthesize(folder, n_images=n_images, seed=7, verbose=False)
    return folder


def dicom_seeds(release: Path, full: bool = False) -> dict[str, bytes]:
    """Seed name -> file bytes: public files, RG1 crops, the synthetic release's DICOMs."""
    names = PUBLIC_SMALL + (PUBLIC_FULL if full else ())
    seeds = {name: public(name).read_bytes() for name in names}
    ds = pydicom.dcmread(public("RG1_UNCR.dcm"))
    rows, cols = ds.Rows // 2, ds.Columns // 2
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[rows:rows + 256, cols:cols + 256]).tobytes()
    ds.Rows = ds.Columns = 256
    seeds["RG1 crop"] = _save(ds)
    ds.compress(uid.JPEG2000Lossless)
    seeds["RG1 crop J2K"] = _save(ds)
    dicoms = sorted((release / "mimic-cxr").rglob("*.dcm"))
    seeds.update({name: path.read_bytes() for name, path in zip(SYNTHETIC, dicoms)})
    return seeds


def _save(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# DICOM mutations

# Edge values per attribute: the ones that break decoders, divide by zero or invert a window.
FIELD_VALUES = {
    "Rows": (0, 1, 2, 3, 255, 4096, 65535),
    "Columns": (0, 1, 2, 3, 255, 4096, 65535),
    "BitsAllocated": (0, 1, 7, 8, 12, 16, 24, 32, 64),
    "BitsStored": (0, 1, 7, 8, 12, 15, 16, 17, 32),
    "HighBit": (0, 7, 11, 15, 16, 31),
    "PixelRepresentation": (0, 1, 2),
    "SamplesPerPixel": (0, 1, 3, 4),
    "PlanarConfiguration": (0, 1, 2),
    "PhotometricInterpretation": ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR",
                                  "YBR_FULL", "", "monochrome2"),
    "NumberOfFrames": ("0", "1", "2", "-1", "1.5", "many"),
    "WindowCenter": ("0", "-1", "1e-300", "1e308", "nan", "inf", "abc", "", "100\\200"),
    "WindowWidth": ("0", "0.5", "1", "-1", "-1000", "nan", "inf", "-inf", "abc", "", "1e308",
                    "100\\0"),
    "RescaleSlope": ("0", "-1", "1e-300", "1e300", "nan", "inf", "abc", ""),
    "RescaleIntercept": ("nan", "-inf", "1e308", "-1e308", "abc", ""),
    "VOILUTFunction": ("LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS", ""),
    "TransferSyntaxUID": (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian,
                          uid.ExplicitVRBigEndian, uid.DeflatedExplicitVRLittleEndian,
                          uid.RLELossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit,
                          uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless,
                          uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, "1.2.3.4", ""),
    # [entries, first stored value, bits] of a VOI or modality LUT, where the seed has one.
    "LUTDescriptor": ((0, 0, 16), (1, 0, 16), (2, 65535, 16), (4096, 0, 8), (10, 0, 0),
                      (4096, 0, 32)),
}
DELETABLE = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
             "SamplesPerPixel", "PhotometricInterpretation", "PixelData", "WindowWidth",
             "RescaleSlope", "LUTData")
PIXEL_LENGTHS = ("empty", "one byte", "minus one", "minus two", "plus one", "plus two", "half",
                 "double")


@dataclass(frozen=True)
class DicomCase:
    """A seed file and the mutations applied to it: header fields first, then bytes."""

    seed: str
    fields: tuple = ()
    edits: tuple = ()


def field_mutations() -> st.SearchStrategy:
    set_value = st.sampled_from(sorted(FIELD_VALUES)).flatmap(
        lambda key: st.tuples(st.just("set"), st.just(key), st.sampled_from(FIELD_VALUES[key])))
    return st.one_of(
        set_value,
        st.tuples(st.just("delete"), st.sampled_from(DELETABLE)),
        st.tuples(st.just("pixel data"), st.sampled_from(PIXEL_LENGTHS)),
    )


def byte_edits() -> st.SearchStrategy:
    """Edits of the encoded bytes; offsets are taken modulo the length they apply to."""
    # Hypothesis favours small integers: half of the offsets are scattered by a multiplicative
    # hash to fall anywhere, half aim at the header just after the 132-byte preamble and magic
    # (edits of those only meet the "not a DICOM file" check, which a few inputs suffice for).
    offset = st.one_of(st.integers(132, 2048),
                       st.integers(0, 2**31).map(lambda v: v * 2654435761 % 2**31))
    return st.one_of(
        # "header" aims at the bytes before the pixel data, where a flip changes the structure.
        st.tuples(st.just("flip"), st.sampled_from(("header", "anywhere")),
                  st.lists(st.tuples(offset, st.integers(1, 255)), min_size=1, max_size=8)),
        st.tuples(st.just("truncate"), offset),
        st.tuples(st.just("cut"), offset, st.integers(1, 64)),
        st.tuples(st.just("insert"), offset, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("fill"), offset, st.sampled_from((b"\x00", b"\xff")),
                  st.integers(1, 64)),
    )


def dicom_cases(seeds: tuple[str, ...] = DICOM_SEEDS) -> st.SearchStrategy[DicomCase]:
    return st.builds(
        DicomCase,
        seed=st.sampled_from(seeds),
        fields=st.lists(field_mutations(), max_size=3).map(tuple),
        edits=st.lists(byte_edits(), max_size=3).map(tuple),
    )


def mutate_dicom(data: bytes, case: DicomCase) -> bytes:
    """The bytes of `case`'s seed after its mutations."""
    if case.fields:
        ds = pydicom.dcmread(io.BytesIO(data))
        for mutation in case.fields:
            _mutate_field(ds, mutation)
        data = _serialize(ds)
    for edit in case.edits:
        data = edit_bytes(data, edit, header_end=_pixel_data_offset(data))
    return data


def _mutate_field(ds: pydicom.Dataset, mutation: tuple) -> None:
    kind, *args = mutation
    if kind == "set":
        key, value = args
        if key == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        elif key == "LUTDescriptor":  # raw: its VR is US or SS, and 65535 is -1 as SS
            implicit, little = ds.original_encoding
            raw = struct.pack(f"{'<' if little else '>'}3H", *value)
            for sequence in ("VOILUTSequence", "ModalityLUTSequence"):
                if sequence in ds and len(ds[sequence].value):
                    item, tag = ds[sequence].value[0], Tag(0x0028, 0x3002)
                    vr = item[tag].VR if tag in item else "US"
                    item[tag] = RawDataElement(tag, vr, 6, raw, 0, implicit, little)
        else:
            _set(ds, key, value)
    elif kind == "delete":
        (key,) = args
        for item in (ds, *[s.value[0] for s in ds if s.VR == "SQ" and len(s.value)]):
            if key in item:
                del item[key]
    elif kind == "pixel data" and "PixelData" in ds:
        pixels = ds.PixelData
        ds.PixelData = {
            "empty": b"", "one byte": pixels[:1], "minus one": pixels[:-1],
            "minus two": pixels[:-2], "plus one": pixels + b"\x00",
            "plus two": pixels + b"\x01\x00", "half": pixels[: len(pixels) // 2],
            "double": pixels + pixels,
        }[args[0]]
        # What no longer starts with an item is written with a defined length (pydicom
        # refuses the undefined one): native-looking pixel data under a compressed syntax.
        ds["PixelData"].is_undefined_length &= ds.PixelData.startswith(b"\xfe\xff\x00\xe0")


def _set(ds: pydicom.Dataset, key: str, value) -> None:
    """Set an attribute, even to a value its VR forbids: pydicom refuses to encode some ("abc"
    as a decimal string); those go in as raw bytes, as other software may have written them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(ds, key, value)
            write_data_element(_buffer(ds), ds[key])
    except Exception:  # noqa: BLE001  (pydicom refuses the value: write its bytes raw)
        tag, raw = Tag(tag_for_keyword(key)), str(value).encode("ascii")
        raw += b" " * (len(raw) % 2)
        implicit, little = ds.original_encoding
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, implicit, little)


def _buffer(ds: pydicom.Dataset) -> DicomBytesIO:
    implicit, little = ds.original_encoding
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
    return buffer


def _serialize(ds: pydicom.Dataset) -> bytes:
    """Preamble, file meta (whatever transfer syntax it now claims) and the dataset in the
    seed's own encoding: `save_as` would re-encode, hiding a mismatch a reader must survive."""
    meta = DicomBytesIO()
    meta.is_implicit_VR, meta.is_little_endian = False, True
    try:
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    except (ValueError, AttributeError):  # an empty transfer syntax: write it as it is
        meta = DicomBytesIO()
        meta.is_implicit_VR, meta.is_little_endian = False, True
        write_file_meta_info(meta, ds.file_meta, enforce_standard=False)
    body = _buffer(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dataset(body, ds)
    return bytes(128) + b"DICM" + meta.getvalue() + body.getvalue()


def _pixel_data_offset(data: bytes) -> int:
    """Where the pixel data element starts (its tag in either byte order), else the end."""
    found = [i for i in (data.find(b"\xe0\x7f\x10\x00"), data.find(b"\x7f\xe0\x00\x10")) if i > 0]
    return min(found, default=len(data))


def edit_bytes(data: bytes, edit: tuple, header_end: int | None = None) -> bytes:
    """One byte-level edit; offsets wrap around the data (or its header, for header flips)."""
    kind, *args = edit
    n = max(len(data), 1)
    if kind == "flip":
        region, flips = args
        span = max(header_end or n, 1) if region == "header" else n
        out = bytearray(data)
        for offset, xor in flips:
            if out:
                out[offset % span % len(out)] ^= xor
        return bytes(out)
    if kind == "truncate":
        return data[: args[0] % n]
    if kind == "cut":
        at = args[0] % n
        return data[:at] + data[at + args[1]:]
    if kind == "insert":
        at = args[0] % n
        return data[:at] + args[1] + data[at:]
    if kind == "fill":
        at, (byte, count) = args[0] % n, args[1:]
        return data[:at] + byte * count + data[at + count:]
    raise ValueError(f"unknown edit {kind!r}")


# ---------------------------------------------------------------------------------------------
# Table mutations

REQUIRED_COLUMNS = {
    "master_sheet.csv": ("dicom_id", "path", "patient_id", "Normal", "CHF", "pneumonia"),
    "fixations.csv": ("DICOM_ID", "X_ORIGINAL", "Y_ORIGINAL", "Time (in secs)"),
    "filenames.csv": ("filename",),
}
CELL_VALUES = (
    "", " ", "abc", "0", "1", "2", "-1", "-0", "1.0", "0.5", "+1", "1_000", "0x10", "1e400",
    "-1e400", "1e-320", "nan", "NaN", "inf", "-inf", "None", "null", "TRUE", "\uff11",
    "9" * 400, "x" * 100_000, "\u00e9", "\u65e5\u672c\u8a9e", "\u202e1", "\U0001f600", '"',
    'a"b', '""', "a,b", "a\nb", "a\rb", "\x00", "\ufeff1", "../../etc/passwd", "files/p1x/",
)
HEADER_VALUES = ("", "normal", "X_ORIGINAL ", " dicom_id", "DICOM_ID", "dicom_id", "CHF",
                 "Unnamed: 0", "\ufeffdicom_id", "filename")
RAW_TEXT = ('"', "\n", "\r", ",", "\x00", '"\n"', "\ufeff", "\\")
ENCODINGS = ("latin-1", "utf-16", "utf-8-sig", "cp1252")


@dataclass(frozen=True)
class TableCase:
    """Mutations of the release's tables, and whether a subset file is passed."""

    mutations: tuple = ()
    with_subset: bool = False


def table_mutations() -> st.SearchStrategy:
    table = st.sampled_from(TABLES)
    index = st.integers(0, 2**31)
    # A required column's cell (where the readers look), or any cell.
    required_cell = st.sampled_from(TABLES).flatmap(lambda t: st.tuples(
        st.just("cell"), st.just(t), st.sampled_from(REQUIRED_COLUMNS[t]), index,
        st.sampled_from(CELL_VALUES)))
    return st.one_of(
        required_cell,
        st.tuples(st.just("any cell"), table, index, index, st.sampled_from(CELL_VALUES)),
        st.tuples(st.just("rename column"), table, index, st.sampled_from(HEADER_VALUES)),
        st.tuples(st.just("drop column"), table, index),
        st.tuples(st.just("extra column"), table, index),
        st.tuples(st.just("short row"), table, index, index),
        st.tuples(st.just("long row"), table, index, st.integers(1, 3)),
        st.tuples(st.just("duplicate row"), table, index),
        st.tuples(st.just("delete rows"), table, index, st.integers(1, 200)),
        st.tuples(st.just("header only"), table),
        st.tuples(st.just("empty"), table),
        st.tuples(st.just("raw text"), table, index, st.sampled_from(RAW_TEXT)),
        st.tuples(st.just("encoding"), table, st.sampled_from(ENCODINGS)),
        st.tuples(st.just("bytes"), table, byte_edits()),
    )


def table_cases() -> st.SearchStrategy[TableCase]:
    return st.builds(TableCase, mutations=st.lists(table_mutations(), max_size=3).map(tuple),
                     with_subset=st.booleans())


def read_tables(egd: Path) -> dict[str, list[list[str]]]:
    """The seed tables as rows of cells (header first)."""
    tables = {}
    for name in TABLES:
        with open(egd / name, newline="", encoding="utf-8-sig") as file:
            tables[name] = list(csv.reader(file))
    return tables


def write_mutated_tables(seed: dict, case: TableCase, egd: Path) -> None:
    """Write `seed`'s tables with `case`'s mutations into `egd`: rows first, then text, then
    bytes (a later stage sees the earlier stage's result)."""
    tables = copy.deepcopy(seed)
    texts: dict[str, str] = {}
    encodings = dict.fromkeys(TABLES, "utf-8")
    edits: dict[str, list] = {name: [] for name in TABLES}
    for kind, name, *args in case.mutations:
        if kind == "raw text":
            texts.setdefault(name, _csv_text(tables[name]))
            at = args[0] % max(len(texts[name]), 1)
            texts[name] = texts[name][:at] + args[1] + texts[name][at:]
        elif kind == "encoding":
            encodings[name] = args[0]
        elif kind == "bytes":
            edits[name].append(args[0])
        elif name not in texts:  # a row edit after a raw text edit has nothing left to edit
            _mutate_rows(tables[name], kind, name, args)
    for name in TABLES:
        text = texts.get(name, _csv_text(tables[name]))
        data = text.encode(encodings[name], errors="replace")
        for edit in edits[name]:
            data = edit_bytes(data, edit)
        (egd / name).write_bytes(data)


def _mutate_rows(rows: list[list[str]], kind: str, name: str, args: list) -> None:
    header, body = (rows[0] if rows else []), rows[1:]
    if kind == "cell":
        column, row, value = args
        if column in header and body:
            body[row % len(body)][header.index(column)] = value
    elif kind == "any cell" and body and header:
        row, column, value = args
        cells = body[row % len(body)]
        if cells:
            cells[column % len(cells)] = value
    elif kind in ("rename column", "drop column") and header:
        column = args[0] % len(header)
        if kind == "rename column":
            header[column] = args[1]
        else:
            for cells in rows:
                del cells[column:column + 1]
    elif kind == "extra column":
        for i, cells in enumerate(rows):
            cells.insert(args[0] % (len(cells) + 1), "extra" if i == 0 else str(i))
    elif kind == "short row" and body:
        cells = body[args[0] % len(body)]
        del cells[args[1] % (len(cells) + 1):]
    elif kind == "long row" and body:
        body[args[0] % len(body)].extend(["spill"] * args[1])
    elif kind == "duplicate row" and body:
        rows.append(list(body[args[0] % len(body)]))
    elif kind == "delete rows" and body:
        start = 1 + args[0] % len(body)
        del rows[start:start + args[1]]
    elif kind == "header only":
        del rows[1:]
    elif kind == "empty":
        rows.clear()


def _csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Judging one input (in the sandbox's child process)

LOADED, REFUSED, BUG, CRASH, HANG = "loaded", "refused", "BUG", "crash", "hang"
FAILURES = (BUG, CRASH, HANG)


def judge_dicom(path: str) -> tuple[str, str]:
    """(verdict, detail) of `read_dicom` on one file."""
    try:
        image = read_dicom(path)
    except DataError as err:
        return _refused(err, [path])
    except Exception as err:  # noqa: BLE001  (anything but a DataError is the bug sought)
        return BUG, _unexpected(err)
    problems = []
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        declared = (int(ds.Rows), int(ds.Columns))
    except Exception as err:  # noqa: BLE001  (it decoded, so its header must be readable)
        return BUG, f"loaded, but the header does not parse: {_unexpected(err)}"
    if image.shape != declared:
        problems.append(f"shape {image.shape}, declared {declared}")
    if image.dtype != np.float32:
        problems.append(f"dtype {image.dtype}")
    if not np.isfinite(image).all():
        problems.append(f"{np.count_nonzero(~np.isfinite(image))} non-finite pixels")
    elif image.size and (image.min() < 0 or image.max() > 1):
        problems.append(f"values in [{image.min()}, {image.max()}]")
    return (BUG, "loaded, but " + "; ".join(problems)) if problems else (LOADED, "")


def judge_release(egd: str, mimic: str, subset: str | None) -> tuple[str, str]:
    """(verdict, detail) of `read_release` on one set of tables."""
    try:
        release = read_release(egd, mimic, subset)
    except DataError as err:
        return _refused(err, [str(Path(egd) / name) for name in TABLES[:2]] + [subset, mimic])
    except Exception as err:  # noqa: BLE001  (anything but a DataError is the bug sought)
        return BUG, _unexpected(err)
    problems = []
    ids = [r.dicom_id for r in release.records]
    if len(set(ids)) != len(ids) or not all(ids):
        problems.append("empty or repeated dicom ids among the records")
    for record in release.records:
        if record.label not in (0, 1, 2) or record.split not in (0, 1, 2):
            problems.append(f"{record.source}: label {record.label}, split {record.split}")
        if record.points.ndim != 2 or record.points.shape[1:] != (2,) or not len(record.points):
            problems.append(f"{record.source}: fixations of shape {record.points.shape}")
        if not (np.isfinite(record.points).all() and np.isfinite(record.times).all()):
            problems.append(f"{record.source}: non-finite fixations")
        if len(record.times) != len(record.points):
            problems.append(f"{record.source}: {len(record.times)} times for "
                            f"{len(record.points)} points")
    if problems:
        return BUG, "; ".join(problems[:3])
    if not release.records:
        return LOADED, "no usable row"
    return LOADED, "some rows skipped" if release.skipped else "every row"


def _refused(err: DataError, files: list[str | None]) -> tuple[str, str]:
    message = str(err)
    named = next((f for f in files if f and message.startswith(f"{f}: ")), None)
    if named is None:
        return BUG, f"DataError that does not start with the file at fault: {message[:300]}"
    return REFUSED, category(message[len(named) + 2:])


def category(reason: str) -> str:
    """A refusal's reason without its particulars, for the histogram."""
    reason = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    reason = re.split(r"(?<=attribute\(s\)) |(?<=column\(s\)) | \(|: |, e\.g\.", reason,
                      maxsplit=1)[0]
    return re.sub(r"\d+", "N", reason)[:70]


def _unexpected(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return f"{type(err).__name__}: {str(err)[:300]} (at {where})"


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _hang() -> None:
    time.sleep(3600)


# The last two check the sandbox itself.
JUDGES = {"dicom": judge_dicom, "release": judge_release, "crash": _crash, "hang": _hang}


# ---------------------------------------------------------------------------------------------
# The sandbox


class Sandbox:
    """A child process that judges inputs one at a time, restarted after a crash or a hang.

    Args:
        timeout_s: the longest one input may take before it counts as a hang.
        memory_gib: the child's address-space limit: a header that claims a huge image must be
            refused, not allocated.
    """

    def __init__(self, timeout_s: float = 10.0, memory_gib: float = 4.0):
        self.timeout_s, self.memory_gib = timeout_s, memory_gib
        # spawn, not fork: the parent may hold threads (torch, hypothesis) a fork would copy.
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._start()

    def judge(self, kind: str, *args, timeout_s: float | None = None) -> tuple[str, str]:
        """(verdict, detail) of `JUDGES[kind](*args)`, or a crash or a hang."""
        timeout_s = timeout_s or self.timeout_s
        self._conn.send((kind, args))
        try:
            if self._conn.poll(timeout_s):
                return self._conn.recv()
        except (EOFError, OSError):  # the child died; its exit code says how
            pass
        self._process.join(1.0)
        if self._process.is_alive():
            verdict, detail = HANG, f"no answer within {timeout_s:g} s"
        else:
            verdict, detail = CRASH, f"judge process died, exit code {self._process.exitcode}"
        self._start()
        return verdict, detail

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._conn.close()

    def _start(self) -> None:
        self.close()
        self._conn, child = self._context.Pipe()
        self._process = self._context.Process(
            target=_serve, args=(child, int(self.memory_gib * 2**30)), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(120):  # imports take a few seconds on a busy machine
            raise RuntimeError("the fuzzing sandbox did not start")
        self._conn.recv()


def _serve(conn, memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    os.environ["RUST_BACKTRACE"] = "0"  # a panicking Rust codec: one line, not a page
    warnings.simplefilter("ignore")  # pydicom warns about every odd value it reads
    conn.send("ready")
    while True:
        kind, args = conn.recv()
        try:
            conn.send(JUDGES[kind](*args))
        except MemoryError as err:  # over the limit: a reader that allocated what it was told
            conn.send((BUG, _unexpected(err)))


# ---------------------------------------------------------------------------------------------
# Running one case (in this process)


@dataclass
class Workspace:
    """What the cases need: seeds, a sandbox, and a folder to write each input into."""

    folder: Path
    release: Path
    sandbox: Sandbox
    dicoms: dict[str, bytes] = field(default_factory=dict)
    tables: dict[str, list[list[str]]] = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path, full: bool = False, timeout_s: float = 10.0) -> Workspace:
        release = make_release(folder / "release")
        (folder / "egd-cxr").mkdir(parents=True, exist_ok=True)
        return cls(folder, release, Sandbox(timeout_s), dicom_seeds(release, full),
                   read_tables(release / "egd-cxr"))

    def run_dicom(self, case: DicomCase) -> tuple[str, str]:
        path = self.folder / "case.dcm"
        path.write_bytes(mutate_dicom(self.dicoms[case.seed], case))
        return self.sandbox.judge("dicom", str(path))

    def run_tables(self, case: TableCase) -> tuple[str, str]:
        egd = self.folder / "egd-cxr"
        write_mutated_tables(self.tables, case, egd)
        subset = str(egd / "filenames.csv") if case.with_subset else None
        return self.sandbox.judge("release", str(egd), str(self.release / "mimic-cxr"), subset)


# ---------------------------------------------------------------------------------------------
# Hypothesis settings of a fuzzing run (the suite's and the benchmark's)

FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
