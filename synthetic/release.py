"""`gazetune synth`: the writer of a synthetic release in the exact EGD-CXR and MIMIC-CXR layout.

Real rows of EGD-CXR are covered by a data-use agreement, so tests, the demo and the CI build
their data here. Everything the reader meets in the real release is reproduced: the byte-identical
headers, quoted multi-line text, ICD codes that look numeric, empty CheXpert cells, calibration screens that
are not in the master sheet, fixations off the image, the authors' screen-to-image mapping
with its 1080-pixel height, odd DICOM sizes, 10- to 16-bit pixels in both photometric
interpretations, with and without rescale and window. The images come from `phantom`.

Layout under OUT::

    egd-cxr/master_sheet.csv, fixations.csv, bounding_boxes.csv, filenames.csv
    egd-cxr/SYNTHETIC.txt (not in the real release: marks the data as synthetic)
    egd-cxr/audio_segmentation_transcripts/<dicom_id>/transcript.json
    mimic-cxr/files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.dcm

With `shortcut` > 0 a bright lead marker is planted in a corner that depends on the class
(`phantom.CORNERS`): in train and validation images (split by `patient_split`, the rule that
`prepare` uses) it sits in the label's corner with probability `shortcut`; in test images it
appears at the same rate in a corner drawn independently of the label.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from synthetic import phantom
from trainable.config import CLASS_NAMES
from trainable.data.egd import SYNTHETIC_MARK
from trainable.data.split import TEST, patient_split
from trainable.errors import GazetuneError

# The release's headers, byte for byte (master sheet, fixations, bounding boxes).
MASTER_COLUMNS = ("dicom_id", "path", "study_id", "patient_id", "stay_id", "gender", "anchor_age", "image_top_pad", "image_bottom_pad", "image_left_pad", "image_right_pad", "dx1", "dx1_icd", "dx2", "dx2_icd", "dx3", "dx3_icd", "dx4", "dx4_icd", "dx5", "dx5_icd", "dx6", "dx6_icd", "dx7", "dx7_icd", "dx8", "dx8_icd", "dx9", "dx9_icd", "normal_reports", "Normal", "CHF", "pneumonia", "consolidation", "enlarged_cardiac_silhouette", "linear__patchy_atelectasis", "lobar__segmental_collapse", "not_otherwise_specified_opacity___pleural__parenchymal_opacity__", "pleural_effusion_or_thickening", "pulmonary_edema__hazy_opacity", "normal_anatomically", "elevated_hemidiaphragm", "hyperaeration", "vascular_redistribution", "atelectasis__chx", "cardiomegaly__chx", "consolidation__chx", "edema__chx", "enlarged_cardiomediastinum__chx", "fracture__chx", "lung_lesion__chx", "lung_opacity__chx", "no_finding__chx", "pleural_effusion__chx", "pleural_other__chx", "pneumonia__chx", "pneumothorax__chx", "support_devices__chx", "cxr_exam_indication")
FIXATION_COLUMNS = ("SESSION_ID", "MEDIA_ID", "DICOM_ID", "CNT", "Time (in secs)", "TIMETICK(f=10000000)", "FPOGX", "FPOGY", "FPOGS", "FPOGD", "FPOGID", "FPOGV", "BPOGX", "BPOGY", "BPOGV", "LPCX", "LPCY", "LPD", "LPS", "LPV", "RPCX", "RPCY", "RPD", "RPS", "RPV", "BKID", "BKDUR", "BKPMIN", "LPMM", "LPMMV", "RPMM", "RPMMV", "SACCADE_MAG", "SACCADE_DIR", "VID_FRAME", "X_ORIGINAL", "Y_ORIGINAL")
BOX_COLUMNS = ("dicom_id", "bbox_name", "x1", "x2", "y1", "y2")
FINDING_COLUMNS = MASTER_COLUMNS[33:44]  # the 11 report findings, 0/1
CHEXPERT_COLUMNS = MASTER_COLUMNS[44:58]  # the 14 CheXpert labels: 1, 0, -1 or empty

SCREEN_W, SCREEN_H = 1920, 1080  # the eye-tracking monitor
CANVAS_W, CANVAS_H = 1920, 1024  # what `resize_pad` pasted the image on
ROW_ORDER = ("CHF", "pneumonia", "Normal")  # pd.concat([chf, pneumonia, normals]) in the release
SESSION_SIZE = 30  # shown files per reading session
CALIBRATION_EVERY = 20  # images per calibration screen, counted per class
SUBSET_FRACTION = 1017 / 1083  # Watanabe et al.'s filenames.csv
REPEAT_FRACTION = 45 / 1083  # 1,083 images of 1,038 patients
# CR Image Storage; Digital X-Ray Image Storage - For Presentation.
SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def _claim(root: Path, force: bool) -> None:
    """Make `root` a folder synth may write into: new, empty, or (with `force`) its own."""
    if root.exists() and not root.is_dir():
        raise GazetuneError(f"synth: {root} is a file, not a folder")
    if not root.is_dir() or not any(root.iterdir()):
        return
    ours = (root / "egd-cxr" / SYNTHETIC_MARK).is_file()
    if not (force and ours):
        raise GazetuneError(
            f"synth: {root} is not empty: synth writes into an empty or new folder"
            + (" (--force replaces the synthetic release it wrote there)" if ours
               else " and never replaces what it did not write"))
    for folder in ("egd-cxr", "mimic-cxr"):  # what synth writes; anything else stays
        shutil.rmtree(root / folder, ignore_errors=True)


def resize_pad(rows: int, cols: int) -> tuple[int, int, int, int]:
    """Padding (top, bottom, left, right) of the 1920x1024 presentation canvas.

    The arithmetic of `image_preparation.py:resize_pad`, float ratio and int() included.
    """
    ratio = float(CANVAS_H) / max(rows, cols)
    new_rows, new_cols = int(rows * ratio), int(cols * ratio)
    dh, dw = CANVAS_H - new_rows, CANVAS_W - new_cols
    return dh // 2, dh - dh // 2, dw // 2, dw - dw // 2


def screen_to_original(fpogx: float, fpogy: float, pads, shape) -> tuple[int, int]:
    """The release's X_ORIGINAL, Y_ORIGINAL of a fixation (the authors' mapping, quirks kept).

    Off-image gazes become (-1, -1) before scaling, hence small negatives on real-size images
    and (0, 0) on images under 1080 pixels (the reference heatmap keeps only y > 0); the height
    denominator is the 1080-pixel screen although the canvas was 1024 high; the DICOM size is
    padded to even; int() truncates towards zero.

    Args:
        fpogx, fpogy: fixation point as fractions of the 1920x1080 screen.
        pads: (top, bottom, left, right) from `resize_pad`.
        shape: (rows, cols) of the DICOM.
    """
    top, bottom, left, right = pads
    eye_x, eye_y = fpogx * SCREEN_W, fpogy * SCREEN_H
    inside = left < eye_x < SCREEN_W - right and top < eye_y < SCREEN_H - bottom
    x0, y0 = (eye_x - left, eye_y - top) if inside else (-1, -1)
    rows, cols = shape[0] + shape[0] % 2, shape[1] + shape[1] % 2
    return (int(cols / (SCREEN_W - left - right) * x0),
            int(rows / (SCREEN_H - top - bottom) * y0))


def original_to_screen(x, y, pads, shape):
    """Screen fractions (5 decimals, like Gazepoint) that `screen_to_original` maps to (x, y).

    We do not know how the canvas sat on the screen; inverting the authors' mapping puts the
    recorded X_ORIGINAL/Y_ORIGINAL on the structure looked at, which is what a heatmap needs.
    """
    top, bottom, left, right = pads
    rows, cols = shape[0] + shape[0] % 2, shape[1] + shape[1] % 2
    eye_x = left + (np.asarray(x) + 0.5) * (SCREEN_W - left - right) / cols
    eye_y = top + (np.asarray(y) + 0.5) * (SCREEN_H - top - bottom) / rows
    return np.round(eye_x / SCREEN_W, 5), np.round(eye_y / SCREEN_H, 5)


@dataclass(frozen=True)
class SynthInfo:
    """What `synthesize` wrote."""

    root: Path
    egd_root: Path
    mimic_root: Path
    n_images: int
    n_patients: int
    class_counts: dict[str, int]
    n_fixations: int
    n_calibration: int
    n_sessions: int
    seconds: float

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {c}" for c, n in self.class_counts.items())
        return (f"synthesized {self.n_images} images ({counts}) of {self.n_patients} patients, "
                f"{self.n_fixations} fixations in {self.n_sessions} sessions with "
                f"{self.n_calibration} calibration screens, in {self.seconds:.1f} s "
                f"-> {self.root}")


@dataclass(frozen=True)
class _Acquisition:
    shape: tuple[int, int]
    modality: str
    photometric: str
    bits: int
    rescale: tuple[float, float] | None  # (slope, intercept)
    windowed: bool


def synthesize(out, n_images: int = 200, seed: int = 0, real_size: bool = False,
               shortcut: float = 0.0, subtlety: float = 0.0, verbose: bool = True,
               force: bool = False) -> SynthInfo:
    """Write a synthetic EGD-CXR + MIMIC-CXR release under `out`; same seed, same bytes.

    Args:
        out: the folder to write `egd-cxr/` and `mimic-cxr/` into.
        n_images: images, balanced over Normal, CHF and pneumonia.
        seed: the only source of randomness.
        real_size: about 3000x2500 pixels like MIMIC-CXR (default: 224 to 384 a side).
        shortcut: in [0, 1], how often a class-placed marker follows the label in train/val.
        subtlety: in [-1, 1]: 0 draws findings at full strength, 1 removes them, and negative
            values exaggerate them (-1: twice as strong), a teaching set on which a few CPU
            epochs at 64 px learn (the demo's).
        verbose: print the one-line summary.
        force: replace a release that `synth` wrote in `out` before (never anything else).

    Raises:
        GazetuneError: `out` is a file, or a folder that holds anything but (with `force`) a
            synthetic release; nothing is written then.
    """
    for name, value, low in (("shortcut", shortcut, 0.0), ("subtlety", subtlety, -1.0)):
        if not low <= value <= 1.0:  # also refuses NaN
            raise GazetuneError(f"synth: --{name} must lie in [{low:g}, 1], got {value}")
    if n_images < 1:
        raise GazetuneError(f"synth: --images must be at least 1, got {n_images}")
    start = time.perf_counter()
    root = Path(out)
    _claim(root, force)
    egd, mimic = root / "egd-cxr", root / "mimic-cxr"
    rng = np.random.default_rng([seed, 0])

    labels = _labels(n_images)
    people = _identities(rng, labels)
    acquisitions = _acquisitions(rng, n_images, real_size)
    split = patient_split([p["patient_id"] for p in people])
    corners = _marker_corners(rng, labels, split, shortcut)

    master, boxes, views, transcripts = [], [], {}, {}
    for i, (label, person, acq) in enumerate(zip(labels, people, acquisitions)):
        image_rng = np.random.default_rng([seed, 1, i])
        chest = phantom.sample_chest(image_rng, label, subtlety)
        pads = resize_pad(*acq.shape)
        dicom_id = person["dicom_id"]
        path = mimic / person["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        image = phantom.render(chest, acq.shape, image_rng)
        _write_dicom(path, image, corners[i], acq, person, seed)
        master.append(_master_row(image_rng, person, label, chest, pads))
        named = phantom.bounding_boxes(chest, acq.shape)
        boxes += [[dicom_id, name, *box] for name, box in named.items()]
        views[dicom_id] = _gaze(image_rng, chest, label, subtlety, acq.shape, pads)
        transcripts[dicom_id] = _transcript(image_rng, label, chest)

    calibrations = _calibration_ids(labels, people)
    files = [p["dicom_id"] for p in people] + calibrations
    random.Random(seed).shuffle(files)  # the authors shuffled all shown files with `random`
    sessions = [files[i : i + SESSION_SIZE] for i in range(0, len(files), SESSION_SIZE)]
    fixations = []
    for s, shown in enumerate(sessions, start=1):
        fixations += _session_rows(np.random.default_rng([seed, 2, s]), s, shown, views)

    egd.mkdir(parents=True, exist_ok=True)
    _write_csv(egd / "master_sheet.csv", MASTER_COLUMNS, master)
    _write_csv(egd / "fixations.csv", FIXATION_COLUMNS, fixations)
    _write_csv(egd / "bounding_boxes.csv", BOX_COLUMNS, boxes)
    _write_subset(egd / "filenames.csv", rng, [p["dicom_id"] for p in people])
    # Not in the real release: `prepare` records it, and reports say that the data are synthetic.
    (egd / SYNTHETIC_MARK).write_text(
        f"A synthetic release written by `gazetune synth` (seed {seed}, subtlety {subtlety:g}, "
        f"shortcut {shortcut:g}): phantom radiographs with simulated gaze, no patient data.\n")
    for dicom_id, transcript in transcripts.items():
        folder = egd / "audio_segmentation_transcripts" / dicom_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "transcript.json").write_text(json.dumps(transcript, indent=1))

    info = SynthInfo(
        root=root, egd_root=egd, mimic_root=mimic, n_images=n_images,
        n_patients=len({p["patient_id"] for p in people}),
        class_counts={c: labels.count(c) for c in ROW_ORDER}, n_fixations=len(fixations),
        n_calibration=len(calibrations), n_sessions=len(sessions),
        seconds=time.perf_counter() - start,
    )
    if verbose:
        print(info)
    return info


def _labels(n: int) -> list[str]:
    """Balanced classes in release order; the remainder goes to CHF first (363/360/360)."""
    counts = [n // 3 + (i < n % 3) for i in range(3)]
    return [c for c, k in zip(ROW_ORDER, counts) for _ in range(k)]


def _acquisitions(rng, n: int, real_size: bool) -> list[_Acquisition]:
    """Sizes, bit depths and encodings; every set of two or more has both photometrics."""
    mono1 = rng.random(n) < 0.3
    if n >= 2 and mono1.all() == mono1.any():
        mono1[1] = not mono1[0]
    out = []
    for i in range(n):
        long_side = rng.integers(2800, 3057) if real_size else rng.integers(288, 385)
        short_side = int(long_side * rng.uniform(0.78, 0.92))
        shape = (long_side, short_side) if rng.random() < 0.85 else (short_side, long_side)
        if i == 0 and shape[1] % 2 == 0:
            shape = (shape[0], shape[1] + 1)  # an odd width in every set
        out.append(_Acquisition(
            shape=(int(shape[0]), int(shape[1])),
            modality="CR" if rng.random() < 0.6 else "DX",
            photometric="MONOCHROME1" if mono1[i] else "MONOCHROME2",
            bits=int(rng.choice([10, 12, 12, 12, 14, 15, 16])),
            rescale=(float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([-1024.0, 0.0, 100.0])))
            if rng.random() < 0.25 else None,
            windowed=bool(rng.random() < 0.85),
        ))
    return out


def _marker_corners(rng, labels, split, shortcut) -> list[str | None]:
    present = rng.random(len(labels)) < shortcut
    random_corner = rng.integers(len(phantom.CORNERS), size=len(labels))
    corners = []
    for label, code, here, k in zip(labels, split, present, random_corner):
        corner = phantom.CORNERS[k] if code == TEST else phantom.CORNERS[CLASS_NAMES.index(label)]
        corners.append(corner if here else None)
    return corners


def _write_dicom(path: Path, display: np.ndarray, corner, acq: _Acquisition, person, seed) -> None:
    """Encode display brightness as a MIMIC-like DICOM (CR or DX, PA view, uint16).

    The marker, if any, is drawn into `display` after the window has been fitted to the
    anatomy, so it lies beyond the window and shows saturated white.
    """
    rng = np.random.default_rng([seed, 3, int(person["study_id"])])
    top = 2**acq.bits - 1
    lo, hi = rng.uniform(0.0, 0.08) * top, rng.uniform(0.8, 1.0) * top
    if acq.photometric == "MONOCHROME1":  # high values display dark
        lo, hi = hi, lo
    p_lo, p_hi = np.percentile(display[::3, ::3], [0.5, 99.5])
    if corner is not None:
        y0, y1, x0, x1 = phantom.marker_box(corner, acq.shape)
        display[y0:y1, x0:x1] = 1.0
    stored = np.rint(lo + display * (hi - lo)).astype("<u2")
    slope, intercept = acq.rescale or (1.0, 0.0)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = SOP_CLASS[acq.modality]

    def uid(kind: str) -> str:  # derived from the seed, so the bytes repeat
        return generate_uid(entropy_srcs=["gazetune-synth", str(seed), person["dicom_id"], kind])

    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid("instance")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.Modality = acq.modality
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.PatientID = person["patient_id"]
    ds.PatientSex = person["gender"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = acq.photometric
    ds.Rows, ds.Columns = acq.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, acq.bits, acq.bits - 1
    ds.PixelRepresentation = 0
    if acq.rescale:
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:g}", f"{slope:g}", "US"
    if acq.windowed:
        m_lo, m_hi = sorted((lo + p * (hi - lo)) * slope + intercept for p in (p_lo, p_hi))
        ds.WindowCenter = f"{(m_lo + m_hi) / 2:.1f}"
        ds.WindowWidth = f"{max(1.0, (m_hi - m_lo) * 1.05):.1f}"
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _gaze(rng, chest, label, subtlety, shape, pads):
    """One reading of one image: FPOGX, FPOGY of 20-45 fixations, a few off the image."""
    n = int(rng.integers(20, 46))
    centres, spreads, weights = phantom.gaze_targets(chest, label, subtlety)
    k = rng.choice(len(weights), size=6 * n, p=weights)
    a, b = (centres[k] + rng.standard_normal((6 * n, 2)) * spreads[k]).T
    x, y = phantom.to_pixels(chest, shape, a, b)
    ok = (x >= 0) & (x <= shape[1] - 1) & (y >= 0) & (y <= shape[0] - 1)
    for corner in phantom.CORNERS:  # nobody studies the lead marker
        y0, y1, x0, x1 = phantom.marker_box(corner, shape)
        ok &= ~((x >= x0 - 1) & (x < x1 + 1) & (y >= y0 - 1) & (y < y1 + 1))
    fx, fy = original_to_screen(x[ok][:n], y[ok][:n], pads, shape)
    off = rng.random(len(fx)) < 0.04  # glances into the black padding beside the image
    left, right = pads[2], pads[3]
    bar = np.where(rng.random(len(fx)) < 0.5, rng.uniform(2, left - 2, len(fx)),
                   rng.uniform(SCREEN_W - right + 2, SCREEN_W - 2, len(fx)))
    fx = np.where(off, np.round(bar / SCREEN_W, 5), fx)
    fy = np.where(off, np.round(rng.uniform(0.05, 0.95, len(fx)), 5), fy)
    return fx, fy, pads, shape


def _calibration_ids(labels, people) -> list[str]:
    """One calibration screen after every 20th image of a class, named after that image."""
    ids, counted = [], dict.fromkeys(CLASS_NAMES, 0)
    for label, person in zip(labels, people):
        counted[label] += 1
        if counted[label] % CALIBRATION_EVERY == 0:
            ids.append(person["dicom_id"][:-5])
    return ids


def _session_rows(rng, session_id: int, shown: list[str], views: dict) -> list[list]:
    """fixations.csv rows of one reading session: each file's fixations, one clock."""
    rows = []
    fixation_id = int(rng.integers(1, 50))
    count, tick = int(rng.integers(1000, 5000)), int(rng.integers(600, 800)) * 10**9
    clock = rng.uniform(5, 30)  # seconds since the tracker started
    drift = rng.normal(0, 12, 2)  # this session's calibration error, screen pixels
    blinks = int(rng.integers(5, 25))
    previous = None
    for dicom_id in shown:
        if dicom_id in views:
            fx, fy, pads, shape = views[dicom_id]
        else:  # a calibration screen: a white disc at the screen centre
            n = int(rng.integers(3, 7))
            fx = np.round((960 + drift[0] + rng.normal(0, 8, n)) / SCREEN_W, 5)
            fy = np.round((540 + drift[1] + rng.normal(0, 8, n)) / SCREEN_H, 5)
            pads, shape = (0, 0, 0, 0), (SCREEN_H, SCREEN_W)  # the authors' code's fallback
        n = len(fx)
        durations = np.clip(rng.lognormal(np.log(0.25), 0.55, n), 0.07, 2.5)
        starts = rng.uniform(0.05, 0.5) + np.concatenate(
            [[0.0], np.cumsum(durations[:-1] + rng.uniform(0.02, 0.12, n - 1))])
        pupils = rng.uniform([0.35, 0.5, 18, 0.9, 3.0], [0.45, 0.6, 30, 1.1, 5.5], (n, 5))
        for j in range(n):
            x, y = float(fx[j]), float(fy[j])
            fpogs, fpogd = round(float(starts[j]), 5), round(float(durations[j]), 5)
            seconds = fpogs + fpogd  # the row is the fixation's last sample: Time = FPOGS + FPOGD
            sx, sy = x * SCREEN_W, y * SCREEN_H
            mag, angle = (0.0, 0.0) if previous is None else (
                np.hypot(sx - previous[0], sy - previous[1]),
                np.degrees(np.arctan2(sy - previous[1], sx - previous[0])) % 360)
            previous = (sx, sy)
            lx, ly, ld, ls, lmm = (round(float(v), 5) for v in pupils[j])
            x_orig, y_orig = screen_to_original(x, y, pads, shape)
            rows.append([
                session_id, 0, dicom_id, count + round((clock + seconds) * 60), seconds,
                float(tick + round((clock + seconds) * 1e7)), x, y, fpogs, fpogd, fixation_id, 1,
                round(x + float(rng.normal(0, 0.002)), 5),
                round(y + float(rng.normal(0, 0.002)), 5), 1,
                lx, ly, ld, ls, 1, round(lx + 0.17, 5), ly, round(ld * 1.02, 5), ls, 1,
                0, 0.0, blinks, lmm, 1, round(lmm * 1.01, 5), 1,
                round(float(mag), 5), round(float(angle), 5), 0, x_orig, y_orig,
            ])
            fixation_id += 1
        clock += float(starts[-1] + durations[-1]) + rng.uniform(0.5, 3.0)
    return rows


def _write_csv(path: Path, header, rows) -> None:
    # pandas.to_csv wrote the release: minimal quoting and "\n" line ends.
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_subset(path: Path, rng, dicom_ids: list[str]) -> None:
    """Watanabe et al.'s filenames.csv: BOM, CRLF, unnamed 1-based index, master-sheet order."""
    n_keep = max(1, round(SUBSET_FRACTION * len(dicom_ids)))
    keep = np.sort(rng.permutation(len(dicom_ids))[:n_keep])
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(["", "filename"])
        writer.writerows([i + 1, dicom_ids[k]] for i, k in enumerate(keep))


# --- master sheet content: identities, ED diagnoses, report findings, indications ---------

_AGES = tuple(f"{a} - {a + 10}" for a in range(20, 80, 10))  # the release keeps 20-80
# (text, ICD code) pairs in the release's mix of ICD-9 and ICD-10; codes like "428" or "038.9"
# look numeric on purpose, texts with commas get quoted.
_DX = {
    "CHF": [("CONGESTIVE HEART FAILURE, UNSPECIFIED", "428.0"),
            ("Heart failure, unspecified", "I50.9"),
            ("Acute on chronic diastolic (congestive) heart failure", "I50.33"),
            ("CHF NOS", "428"), ("Hypertensive heart disease with heart failure", "I11.0")],
    "pneumonia": [("PNEUMONIA, ORGANISM UNSPECIFIED", "486"),
                  ("Pneumonia, unspecified organism", "J18.9"),
                  ("Lobar pneumonia, unspecified organism", "J18.1"),
                  ("Bronchopneumonia, unspecified organism", "J18.0")],
    "Normal": [("CHEST PAIN NOS", "786.50"), ("Chest pain, unspecified", "R07.9"),
               ("Syncope and collapse", "R55"), ("Dizziness and giddiness", "R42"),
               ("Other chest pain", "R07.89"), ("COUGH", "786.2")],
    "other": [("HYPERTENSION NOS", "401.9"), ("Essential (primary) hypertension", "I10"),
              ("Type 2 diabetes mellitus without complications", "E11.9"),
              ("Shortness of breath", "R06.02"), ("Acute kidney failure, unspecified", "N17.9"),
              ("Unspecified atrial fibrillation", "I48.91"), ("SEPTICEMIA NOS", "038.9"),
              ("Hyperlipidemia, unspecified", "E78.5"), ("FEVER, UNSPECIFIED", "780.60"),
              ("Chronic obstructive pulmonary disease, unspecified", "J44.9")],
}
_COMPLAINT = {
    "CHF": ["shortness of breath and leg swelling", "dyspnea on exertion, hx CHF", "orthopnea"],
    "pneumonia": ["fever and productive cough", "cough, fever, chills", "hypoxia and cough"],
    "Normal": ["chest pain", "syncope", "palpitations", "s/p fall", "shortness of breath"],
}
_QUESTION = {
    "CHF": ["eval for pulmonary edema", "?CHF", "eval for effusion"],
    "pneumonia": ["eval for pneumonia", "r/o infiltrate", "?pna"],
    "Normal": ["eval for acute process", "?pna", "eval for acute cardiopulmonary process"],
}


def _identities(rng, labels: list[str]) -> list[dict]:
    """MIMIC-style ids per image; about 4% of the patients have two images (never fewer than one
    such patient in a set of two or more)."""
    n = len(labels)
    patients = _unique_ints(rng, 10_000_000, 20_000_000, n)
    studies = _unique_ints(rng, 50_000_000, 60_000_000, n)
    stays = _unique_ints(rng, 30_000_000, 40_000_000, n)
    people = []
    for i in range(n):
        dicom_id = "-".join(f"{v:08x}" for v in rng.integers(0, 2**32, 5))
        people.append({"dicom_id": dicom_id, "patient_id": str(patients[i]),
                       "study_id": str(studies[i]), "stay_id": str(stays[i]),
                       "gender": "FM"[rng.integers(2)],
                       "anchor_age": _AGES[rng.integers(len(_AGES))]})
    n_repeat = max(1, round(REPEAT_FRACTION * n)) if n >= 2 else 0
    rows = rng.permutation(n)[: 2 * n_repeat]
    for first, second in zip(rows[0::2], rows[1::2]):  # a second study of the same patient
        for key in ("patient_id", "gender", "anchor_age"):
            people[second][key] = people[first][key]
    for p in people:
        pid = p["patient_id"]
        p["path"] = f"files/p{pid[:2]}/p{pid}/s{p['study_id']}/{p['dicom_id']}.dcm"
    return people


def _unique_ints(rng, low: int, high: int, n: int) -> list[int]:
    values: dict[int, None] = {}
    while len(values) < n:
        values.update(dict.fromkeys(rng.integers(low, high, n).tolist()))
    return list(values)[:n]


def _master_row(rng, person: dict, label: str, chest: phantom.Chest, pads) -> list:
    """One master-sheet row: ids, pads, ED diagnoses, labels, report findings, indication."""
    row = dict.fromkeys(MASTER_COLUMNS, "")
    row.update({k: person[k] for k in ("dicom_id", "path", "study_id", "patient_id", "stay_id",
                                        "gender", "anchor_age")})
    row.update(zip([f"image_{side}_pad" for side in ("top", "bottom", "left", "right")], pads))
    own = _DX[label]
    dx = [own[rng.integers(len(own))]]
    dx += [_DX["other"][k] for k in rng.permutation(len(_DX["other"]))[: rng.integers(0, 9)]]
    for i, (text, code) in enumerate(dx, start=1):
        row[f"dx{i}"], row[f"dx{i}_icd"] = text, code
    row["normal_reports"] = int(label == "Normal")
    row.update({c: int(c == label) for c in CLASS_NAMES})
    row.update(_report_findings(rng, label, chest))
    row.update(_chexpert(rng, label, chest))
    row["cxr_exam_indication"] = _indication(rng, label, person["gender"])
    return [row[c] for c in MASTER_COLUMNS]


def _report_findings(rng, label, chest) -> dict:
    """The 11 report-finding columns, 0/1, consistent with the class and the drawn image."""
    chance = lambda p: int(rng.random() < p)
    f = dict.fromkeys(FINDING_COLUMNS, 0)
    if label == "Normal":
        f.update(normal_anatomically=1, hyperaeration=chance(0.05))
    elif label == "CHF":
        f.update(enlarged_cardiac_silhouette=chance(0.8),
                 pulmonary_edema__hazy_opacity=chance(0.75),
                 vascular_redistribution=chance(0.35), linear__patchy_atelectasis=chance(0.15),
                 pleural_effusion_or_thickening=int(bool(chest.effusion)))
    else:
        consolidation = chance(0.55)
        f.update(consolidation=consolidation, linear__patchy_atelectasis=chance(0.2),
                 lobar__segmental_collapse=chance(0.05))
        f["not_otherwise_specified_opacity___pleural__parenchymal_opacity__"] = (
            1 if not consolidation else chance(0.4))
    return f


def _chexpert(rng, label, chest) -> dict:
    """The 14 CheXpert columns: 1, 0, -1 (uncertain) or empty (not mentioned)."""
    pick = lambda values, p: values[rng.choice(len(values), p=p)]
    c = dict.fromkeys(CHEXPERT_COLUMNS, "")
    if label == "Normal":
        c["no_finding__chx"] = pick(["1", ""], [0.85, 0.15])
    elif label == "CHF":
        c["cardiomegaly__chx"] = pick(["1", "-1", ""], [0.6, 0.15, 0.25])
        c["edema__chx"] = pick(["1", "-1", "0", ""], [0.5, 0.2, 0.1, 0.2])
        c["pleural_effusion__chx"] = "1" if chest.effusion else pick(["0", ""], [0.4, 0.6])
        c["enlarged_cardiomediastinum__chx"] = pick(["1", ""], [0.1, 0.9])
    else:
        c["pneumonia__chx"] = pick(["1", "-1", ""], [0.5, 0.3, 0.2])
        c["lung_opacity__chx"] = pick(["1", ""], [0.6, 0.4])
        c["consolidation__chx"] = pick(["1", "-1", ""], [0.3, 0.1, 0.6])
        c["atelectasis__chx"] = pick(["1", "-1", ""], [0.2, 0.1, 0.7])
    c["support_devices__chx"] = pick(["1", ""], [0.1, 0.9])
    return c


def _indication(rng, label, gender) -> str:
    """MIMIC-style indication with `___` placeholders; sometimes split over two lines."""
    who = "woman" if gender == "F" else "man"
    complaint = _COMPLAINT[label][rng.integers(len(_COMPLAINT[label]))]
    question = _QUESTION[label][rng.integers(len(_QUESTION[label]))]
    if rng.random() < 0.25:
        return f"___{gender} with {complaint}\n// {question}"
    return f"___ year old {who} with {complaint}.  // {question}"


def _transcript(rng, label: str, chest: phantom.Chest) -> dict:
    """The dictation: `full_text` plus timed phrases, as in transcript.json of the release."""
    if label == "CHF":
        phrases = ["the cardiac silhouette is enlarged",
                   "there is perihilar haziness consistent with pulmonary edema"]
        phrases += ["there is a pleural effusion"] if chest.effusion else []
    elif label == "pneumonia":
        op = chest.opacity
        phrases = [f"there is an opacity in the {op.side} {op.zone} lung zone",
                   "findings are concerning for pneumonia"]
    else:
        phrases = ["the lungs are clear", "no acute cardiopulmonary process"]
    clock, timed = float(rng.uniform(0.5, 2.0)), []
    for phrase in phrases:
        end = clock + 0.3 * len(phrase.split()) + float(rng.uniform(0, 0.5))
        timed.append({"phrase": phrase, "begin_time": round(clock, 2), "end_time": round(end, 2)})
        clock = end + float(rng.uniform(0.2, 1.0))
    return {"full_text": ". ".join(phrases) + ".", "time_stamped_text": timed}
