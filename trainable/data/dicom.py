"""Decode one radiograph DICOM into a display-ready grayscale image in [0, 1].

The display pipeline is the standard's (PS3.3 C.11): stored values -> modality LUT or rescale
-> VOI LUT or window -> presentation (MONOCHROME1 is inverted so that bright means dense).
pydicom implements each step; this module chains them, normalises by the output range of the
VOI step, and turns every decoding failure into a `DataError` that names the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from trainable.errors import DataError

# Type 1 attributes of the Image Pixel module that decoding needs (PS3.3 C.7.6.3).
REQUIRED = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelData",
)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
DISPLAY = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


def read_dicom(path: str | Path) -> np.ndarray:
    """Read a single-frame grayscale DICOM as a display-ready image.

    Applies the modality LUT (or rescale slope/intercept), then the first VOI LUT or window
    (a VOI LUT sequence wins over a window, as pydicom's `apply_voi_lut` prefers), scales the
    VOI output range to [0, 1] and inverts MONOCHROME1. Without a VOI LUT or window, the image
    after the modality LUT is min-max scaled. Compressed transfer syntaxes decode through the
    pylibjpeg plugins (JPEG 2000, JPEG lossless, JPEG-LS, RLE).

    Args:
        path: the DICOM file.

    Returns:
        float32 array in [0, 1].

    Shape:
        [H, W] = (Rows, Columns).

    Raises:
        DataError: not a DICOM file, a missing required attribute, no pixel data, truncated or
            undecodable pixel data, a colour or multi-frame image, an invalid window, or a
            rescale or window that gives non-finite values.
    """
    path = Path(path)
    ds = _read(path)
    missing = [name for name in REQUIRED if name not in ds]
    if missing:
        raise DataError(f"{path}: missing required DICOM attribute(s) {', '.join(missing)}")
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric not in MONOCHROME or ds.SamplesPerPixel != 1:
        raise DataError(
            f"{path}: not a grayscale image (PhotometricInterpretation {photometric!r}, "
            f"SamplesPerPixel {ds.SamplesPerPixel})"
        )
    try:
        with warnings.catch_warnings():  # pydicom warns before failing on a malformed IS
            warnings.simplefilter("ignore")
            frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: invalid NumberOfFrames {ds.NumberOfFrames!r}") from err
    if frames != 1:
        raise DataError(f"{path}: {frames} frames; a radiograph has one")

    stored = _decode(ds, path)
    try:
        image = _display(stored, ds)
    except Exception as err:  # a malformed LUT or window fails in many ways inside pydicom
        reason = f"{type(err).__name__}: {err}"
        raise DataError(f"{path}: cannot apply the modality/VOI LUT or window ({reason})") from err
    if not np.isfinite(image).all():  # NaN or infinite rescale or window values pass pydicom
        settings = ", ".join(f"{name} {ds.get(name)!r}" for name in DISPLAY if name in ds)
        raise DataError(f"{path}: the modality/VOI transform gives non-finite values ({settings})")
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)


def _read(path: Path) -> pydicom.Dataset:
    if not path.is_file():
        raise DataError(f"{path}: no such DICOM file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
            # pydicom converts elements on first access: convert them all here, so that a
            # corrupt element (an unknown VR, a bad value) is named as an unreadable header
            # instead of escaping from wherever it happens to be read first.
            ds.walk(lambda dataset, element: None)
    except InvalidDicomError as err:
        raise DataError(f"{path}: not a DICOM file ({err})") from err
    except Exception as err:  # a corrupt header fails in many ways deep inside pydicom
        raise DataError(f"{path}: unreadable DICOM header ({type(err).__name__}: {err})") from err
    # pydicom only warns when the file ends inside an element, and may then return an empty
    # dataset: that is a truncated file, and it is named as one.
    for warning in caught:
        if "end of file" in str(warning.message).lower():
            raise DataError(f"{path}: truncated file ({warning.message})")
    return ds


def _decode(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored values, decompressed. Codec plugins raise assorted exception types, all wrapped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        # BaseException, not Exception: a codec written in Rust (pylibjpeg-rle) panics on some
        # corrupt streams with pyo3's PanicException, which derives from BaseException.
        reason = f"{type(err).__name__}: {err}"
        raise DataError(f"{path}: cannot decode the pixel data ({reason})") from err
    expected = (int(ds.Rows), int(ds.Columns))
    if stored.shape != expected:
        raise DataError(f"{path}: pixel data is {stored.shape}, Rows x Columns is {expected}")
    return stored


def _display(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Modality then VOI transform, scaled to [0, 1] (float64).

    pydicom's VOI functions keep the stored-value scale (a window maps onto the full range of
    the stored bits, a VOI LUT onto its entries), so the output range is found by passing
    through the same function the inputs that reach its two ends.
    """
    values = apply_modality_lut(stored, ds)  # integers stay integers: a VOI LUT indexes by them
    if _has_voi_lut(ds):
        first, n_entries = int(ds.VOILUTSequence[0].LUTDescriptor[1]), _lut_entries(ds)
        transform, ends = apply_voi, np.arange(first, first + n_entries)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        transform, ends = apply_windowing, np.array([-np.inf, np.inf])
    else:
        transform, ends = None, values

    if transform is not None:
        values = transform(values, ds).astype(np.float64)
        ends = transform(ends, ds).astype(np.float64)
    values = values.astype(np.float64)
    low, high = float(ends.min()), float(ends.max())
    if high <= low:  # a flat image (or a constant LUT) carries no contrast to scale
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    items = ds.get("VOILUTSequence")
    return bool(items) and "LUTDescriptor" in items[0] and "LUTData" in items[0]


def _lut_entries(ds: pydicom.Dataset) -> int:
    # PS3.3 C.11.1.1.1: a first value of 0 means 2**16 entries.
    return int(ds.VOILUTSequence[0].LUTDescriptor[0]) or 2**16
