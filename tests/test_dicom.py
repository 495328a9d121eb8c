"""read_dicom on real public DICOM files (pydicom-data, pydicom's wheel) and broken copies."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from data_fixtures import write_dicom
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi
from pydicom.uid import JPEG2000Lossless, RLELossless

from trainable.data import read_dicom
from trainable.errors import DataError


def public(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not installed (pydicom-data is a test dependency)"
    return path


def linear_window(values, center, width):
    """PS3.3 C.11.2.1.2.1 'LINEAR' onto [0, 1], written out independently of pydicom."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


@pytest.mark.parametrize(
    "uncompressed, compressed",
    [("RG1_UNCR.dcm", "RG1_J2KR.dcm"),  # chest radiograph, MONOCHROME1, 15 bits
     ("RG3_UNCR.dcm", "RG3_J2KR.dcm"),  # radiograph, MONOCHROME1, 10 bits
     ("MR_small.dcm", "MR_small_RLE.dcm")],
)
def test_compressed_twin_decodes_identically(uncompressed, compressed):
    reference = read_dicom(public(uncompressed))
    assert np.array_equal(read_dicom(public(compressed)), reference)
    assert reference.dtype == np.float32 and 0.0 <= reference.min() < reference.max() <= 1.0


def test_chest_radiograph_is_windowed_and_monochrome1_inverted():
    path = public("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    image = read_dicom(path)
    assert image.shape == (ds.Rows, ds.Columns)
    expected = 1.0 - linear_window(ds.pixel_array.astype(np.float64), 15000, 30000)
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_rescale_is_applied_before_the_window():
    # MR2: slope 3.77, window 1000/2000 in rescaled units; ignoring the slope would put most
    # pixels below the window.
    path = public("MR2_UNCR.dcm")
    ds = pydicom.dcmread(path)
    rescaled = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = linear_window(rescaled, float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(read_dicom(path), expected, atol=1e-6)
    assert np.array_equal(read_dicom(public("MR2_J2KR.dcm")), read_dicom(path))


def test_without_window_the_modality_output_is_min_max_scaled():
    # CT_small: rescale intercept -1024 and no window; mlut_18: a Modality LUT Sequence.
    for name in ("CT_small.dcm", "mlut_18.dcm"):
        ds = pydicom.dcmread(public(name))
        values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        expected = (values - values.min()) / (values.max() - values.min())
        np.testing.assert_allclose(read_dicom(public(name)), expected, atol=1e-6)


def test_voi_lut_sequence_is_scaled_by_its_entries():
    path = public("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    expected = (apply_voi(ds.pixel_array, ds) - lut.min()) / (lut.max() - lut.min())
    np.testing.assert_allclose(read_dicom(path), expected, atol=1e-6)


def lut_item(lut: np.ndarray, first: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut), first, bits]
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    return item


def test_nonlinear_modality_and_voi_luts_are_applied(tmp_path):
    # The IHE files above carry nearly linear LUTs; these curves show each LUT really acts.
    pixels = np.arange(0, 4096, 4, dtype=np.uint16).reshape(32, 32)
    modality = np.round(np.sqrt(np.arange(4096) / 4095) * 4095)  # stored -> [0, 4095], concave
    voi = np.round((np.arange(4096) / 4095) ** 3 * 1023)  # [0, 4095] -> [0, 1023], convex
    path = write_dicom(tmp_path / "luts.dcm", pixels)
    ds = pydicom.dcmread(path)
    ds.ModalityLUTSequence = [lut_item(modality, 0, 16)]  # C.11.1.1.1: 8 or 16 bits
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    ds.save_as(path)
    mapped = modality[pixels]
    expected = (mapped - mapped.min()) / (mapped.max() - mapped.min())  # no window: min-max
    np.testing.assert_allclose(read_dicom(path), expected, atol=1e-6)
    ds.VOILUTSequence = [lut_item(voi, 0, 10)]
    ds.WindowCenter, ds.WindowWidth = 100, 50  # the LUT wins, as pydicom prefers it
    ds.save_as(path)
    np.testing.assert_allclose(read_dicom(path), voi[modality[pixels].astype(int)] / 1023,
                               atol=1e-6)


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_jpeg_lossless_decodes_through_the_plugins(name):
    ds = pydicom.dcmread(public(name))
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    image = read_dicom(public(name))
    assert image.shape == (ds.Rows, ds.Columns) and image.min() == 0.0 and image.max() == 1.0


@settings(max_examples=12, deadline=None)
@given(
    bits=st.integers(10, 16),
    photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2"]),
    windowed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_own_files_10_to_16_bits_both_photometrics_and_codecs(
    tmp_path_factory, bits, photometric, windowed, seed
):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 2**bits, (41, 37)).astype(np.uint16)  # odd sizes on purpose
    center, width = 2 ** (bits - 1), 2 ** (bits - 2)
    folder = tmp_path_factory.mktemp("own")
    path = write_dicom(folder / "plain.dcm", pixels, photometric, bits,
                       window=(center, width) if windowed else None)
    image = read_dicom(path)
    values = pixels.astype(np.float64)
    expected = (linear_window(values, center, width) if windowed
                else (values - values.min()) / (values.max() - values.min()))
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    np.testing.assert_allclose(image, expected, atol=1e-6)
    for syntax in (RLELossless, JPEG2000Lossless):
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(folder / f"{syntax.name[:8]}.dcm")
        assert np.array_equal(read_dicom(folder / f"{syntax.name[:8]}.dcm"), image)


def test_signed_pixels_with_rescale(tmp_path):
    pixels = np.arange(-600, 600, 4, dtype=np.int16).reshape(15, 20)
    path = write_dicom(tmp_path / "ct.dcm", pixels, bits_stored=12, signed=True,
                       rescale=(2.0, -100.0), window=(0.0, 800.0))
    expected = linear_window(pixels * 2.0 - 100.0, 0.0, 800.0)
    np.testing.assert_allclose(read_dicom(path), expected, atol=1e-6)


BROKEN_PUBLIC = {
    "MR_truncated.dcm": "less than expected",  # pixel data shorter than Rows x Columns
    "rtplan.dcm": "missing required DICOM attribute(s) Rows",  # no image at all
    "rtplan_truncated.dcm": "missing required",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated file",
    "JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode the pixel data",
    "no_meta.dcm": "not a DICOM file",
    "badVR.dcm": "NumberOfFrames",
    "SC_rgb.dcm": "not a grayscale image",
    "emri_small.dcm": "10 frames",
}


@pytest.mark.parametrize("name, reason", BROKEN_PUBLIC.items())
def test_public_broken_files_fail_naming_file_and_reason(name, reason):
    path = public(name)
    with pytest.raises(DataError) as caught:
        read_dicom(path)
    assert isinstance(caught.value, ValueError)
    assert path in str(caught.value) and reason in str(caught.value)


def broken_copies(folder):
    """Damaged copies of real files, each with the words its error must contain."""
    j2k = Path(public("RG3_J2KR.dcm")).read_bytes()
    plain = Path(public("RG3_UNCR.dcm")).read_bytes()
    (folder / "j2k_cut.dcm").write_bytes(j2k[: len(j2k) // 2])
    yield folder / "j2k_cut.dcm", "truncated file"
    (folder / "plain_cut.dcm").write_bytes(plain[: len(plain) - 1000])
    yield folder / "plain_cut.dcm", "less than expected"
    codestream = j2k.index(b"\xff\x4f\xff\x51")  # SOC + SIZ markers of the JPEG 2000 stream
    damaged = j2k[:codestream] + bytes(64) + j2k[codestream + 64 :]
    (folder / "j2k_damaged.dcm").write_bytes(damaged)
    yield folder / "j2k_damaged.dcm", "cannot decode the pixel data"
    (folder / "text.dcm").write_text("not an image\n")
    yield folder / "text.dcm", "not a DICOM file"
    yield folder / "absent.dcm", "no such DICOM file"
    ds = pydicom.dcmread(public("CT_small.dcm"))
    del ds.Rows
    ds.save_as(folder / "no_rows.dcm")
    yield folder / "no_rows.dcm", "missing required DICOM attribute(s) Rows"
    ds = pydicom.dcmread(public("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.2.1143.99"  # no codec knows it
    ds.save_as(folder / "unknown_codec.dcm")
    yield folder / "unknown_codec.dcm", "cannot decode the pixel data"
    ds = pydicom.dcmread(public("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 0  # LINEAR needs a width of at least 1
    ds.save_as(folder / "bad_window.dcm")
    yield folder / "bad_window.dcm", "window"


def test_own_broken_copies_fail_naming_file_and_reason(tmp_path):
    for path, reason in broken_copies(tmp_path):
        with pytest.raises(DataError) as caught:
            read_dicom(path)
        assert str(path) in str(caught.value) and reason in str(caught.value), caught.value
