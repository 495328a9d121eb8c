"""Hand-made releases in the EGD-CXR / MIMIC-CXR format, for the reader's and cache's edge cases.

`synthetic.release` writes realistic releases; these are smaller and fully controlled:
each image's shape, label, patient and fixations are chosen by the test, and the tables are
plain lists that a test edits before writing (drop a column, break a label, add a calibration
screen). No real dataset row is used: ids are random hex, like MIMIC's.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# The header lines of the release, byte for byte.
MASTER_HEADER_LINE = (
    "dicom_id,path,study_id,patient_id,stay_id,gender,anchor_age,image_top_pad,image_bottom_pad,"
    "image_left_pad,image_right_pad,dx1,dx1_icd,dx2,dx2_icd,dx3,dx3_icd,dx4,dx4_icd,dx5,dx5_icd,"
    "dx6,dx6_icd,dx7,dx7_icd,dx8,dx8_icd,dx9,dx9_icd,normal_reports,Normal,CHF,pneumonia,"
    "consolidation,enlarged_cardiac_silhouette,linear__patchy_atelectasis,"
    "lobar__segmental_collapse,"
    "not_otherwise_specified_opacity___pleural__parenchymal_opacity__,"
    "pleural_effusion_or_thickening,pulmonary_edema__hazy_opacity,normal_anatomically,"
    "elevated_hemidiaphragm,hyperaeration,vascular_redistribution,atelectasis__chx,"
    "cardiomegaly__chx,consolidation__chx,edema__chx,enlarged_cardiomediastinum__chx,"
    "fracture__chx,lung_lesion__chx,lung_opacity__chx,no_finding__chx,pleural_effusion__chx,"
    "pleural_other__chx,pneumonia__chx,pneumothorax__chx,support_devices__chx,cxr_exam_indication"
)
FIXATION_HEADER_LINE = (
    "SESSION_ID,MEDIA_ID,DICOM_ID,CNT,Time (in secs),TIMETICK(f=10000000),FPOGX,FPOGY,FPOGS,"
    "FPOGD,FPOGID,FPOGV,BPOGX,BPOGY,BPOGV,LPCX,LPCY,LPD,LPS,LPV,RPCX,RPCY,RPD,RPS,RPV,BKID,"
    "BKDUR,BKPMIN,LPMM,LPMMV,RPMM,RPMMV,SACCADE_MAG,SACCADE_DIR,VID_FRAME,X_ORIGINAL,Y_ORIGINAL"
)
MASTER_HEADER = MASTER_HEADER_LINE.split(",")
FIXATION_HEADER = FIXATION_HEADER_LINE.split(",")
LABELS = ("Normal", "CHF", "pneumonia")


@dataclass
class FakeImage:
    dicom_id: str
    patient_id: str
    study_id: str
    label: str
    shape: tuple[int, int]
    points: list[tuple[int, int]]  # (x, y) = (X_ORIGINAL, Y_ORIGINAL), off-image ones included
    photometric: str = "MONOCHROME2"

    @property
    def path(self) -> str:
        patient = f"p{self.patient_id[:2]}/p{self.patient_id}"
        return f"files/{patient}/s{self.study_id}/{self.dicom_id}.dcm"


@dataclass
class Tables:
    """A release's tables as rows of strings, edited by tests before `write`."""

    master_header: list[str]
    master: list[list[str]]
    fixation_header: list[str]
    fixations: list[list[str]]
    images: list[FakeImage] = field(default_factory=list)

    def header(self, table: str) -> list[str]:
        return self.master_header if table == "master" else self.fixation_header

    def set(self, table: str, row: int, column: str, value: str) -> None:
        getattr(self, table)[row][self.header(table).index(column)] = value

    def drop_column(self, table: str, column: str) -> None:
        index = self.header(table).index(column)
        del self.header(table)[index]
        for row in getattr(self, table):
            del row[index]


def random_id(rng: np.random.Generator) -> str:
    """A MIMIC-style dicom id: five dash-separated groups of 8 hex digits."""
    return "-".join(f"{int(rng.integers(0, 2**32)):08x}" for _ in range(5))


def fake_images(n: int, seed: int = 0, shapes=((48, 40), (41, 37), (36, 52))) -> list[FakeImage]:
    """`n` images, labels cycling CHF, pneumonia, Normal; images 0 and 1 share a patient.

    Each image has 4-8 on-image fixations, one off-image mark ((0, 0) on even images, as the
    authors' mapping writes it below 1080 pixels, (-1, -2) on odd ones) and, for every third
    image, one fixation just beyond the right edge (x = W).
    """
    rng = np.random.default_rng(seed)
    images = []
    patients = [f"{p}" for p in rng.choice(np.arange(10_000_000, 20_000_000), n, replace=False)]
    patients[1] = patients[0]
    for i in range(n):
        height, width = shapes[i % len(shapes)]
        count = int(rng.integers(4, 9))
        points = [(int(x), int(y)) for x, y in zip(rng.integers(0, width, count),
                                                   rng.integers(1, height, count), strict=True)]
        points.append((-1, -2) if i % 2 else (0, 0))
        if i % 3 == 0:
            points.append((width, height // 2))
        images.append(FakeImage(
            dicom_id=random_id(rng), patient_id=patients[i],
            study_id=str(int(rng.integers(50_000_000, 60_000_000))),
            label=("CHF", "pneumonia", "Normal")[i % 3], shape=(height, width), points=points,
            photometric=("MONOCHROME2", "MONOCHROME1")[i % 2],
        ))
    return images


def tables(images: list[FakeImage]) -> Tables:
    """Master sheet and fixations rows, with a calibration screen after every third image."""
    master, fixations = [], []
    for i, image in enumerate(images):
        row = dict.fromkeys(MASTER_HEADER, "")
        row.update(dicom_id=image.dicom_id, path=image.path, study_id=image.study_id,
                   patient_id=image.patient_id, gender="F", anchor_age="50 - 60",
                   dx1="Heart failure, unspecified", dx1_icd="428", normal_reports="0",
                   cxr_exam_indication="___ with dyspnea.\nEvaluate for \"edema\", effusion.")
        row.update({name: str(int(name == image.label)) for name in LABELS})
        master.append([row[name] for name in MASTER_HEADER])
        for j, (x, y) in enumerate(image.points):
            fixations.append(_fixation_row(1 + i // 10, image.dicom_id, j, x, y))
        if i % 3 == 2:  # a calibration screen: an id that is not in the master sheet
            fixations.append(_fixation_row(1 + i // 10, image.dicom_id[:-5], 0, 960, 540))
    return Tables(list(MASTER_HEADER), master, list(FIXATION_HEADER), fixations, images)


def _fixation_row(session: int, dicom_id: str, index: int, x: int, y: int) -> list[str]:
    row = dict.fromkeys(FIXATION_HEADER, "0")
    start, duration = 0.2 + 0.4 * index, 0.25
    row.update({
        "SESSION_ID": str(session), "DICOM_ID": dicom_id, "CNT": str(10 * index),
        "Time (in secs)": repr(start + duration), "FPOGS": repr(start), "FPOGD": repr(duration),
        "FPOGID": str(index + 1), "FPOGV": "1", "X_ORIGINAL": str(x), "Y_ORIGINAL": str(y),
    })
    return [row[name] for name in FIXATION_HEADER]


def write_release(root: Path, data: Tables, dicoms: bool = True) -> tuple[Path, Path]:
    """Write `root/egd-cxr/{master_sheet,fixations}.csv` and the DICOMs (or only their
    folders); the two roots."""
    egd, mimic = root / "egd-cxr", root / "mimic-cxr"
    egd.mkdir(parents=True, exist_ok=True)
    write_csv(egd / "master_sheet.csv", data.master_header, data.master)
    write_csv(egd / "fixations.csv", data.fixation_header, data.fixations)
    for i, image in enumerate(data.images):
        (mimic / image.path).parent.mkdir(parents=True, exist_ok=True)
        if dicoms:
            write_dicom(mimic / image.path, _pixels(image.shape, seed=i), image.photometric)
    return egd, mimic


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def write_subset(path: Path, names: list[str]) -> None:
    """Watanabe et al.'s `filenames.csv` format: UTF-8 BOM, CRLF, unnamed 1-based index."""
    lines = [",filename"] + [f"{i},{name}" for i, name in enumerate(names, start=1)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    signed: bool = False,
) -> Path:
    """A single-frame CR DICOM with the given stored values (uncompressed).

    Args:
        pixels: stored values, uint16 (int16 when `signed`), within `bits_stored` bits.
        window: (center, width), or None for no VOI window.
        rescale: (slope, intercept), or None.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "CR", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _pixels(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth 12-bit gradient with noise: every image distinct, never flat."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    values = 1000 + 40 * rows + 25 * cols + rng.integers(0, 200, shape)
    return np.clip(values, 0, 4095).astype(np.uint16)
