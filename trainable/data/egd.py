"""Reader of the Eye Gaze Data for Chest X-rays release (EGD-CXR 1.0.0), files unchanged.

`master_sheet.csv` gives one image per row (one-hot `Normal`, `CHF`, `pneumonia`, the MIMIC-CXR
`path`), `fixations.csv` the radiologist's fixations in original DICOM pixels (`X_ORIGINAL`,
`Y_ORIGINAL`). A table without a required column fails at once; a row that cannot be used is
skipped and named, so one bad row never costs the whole release. Master-sheet rows are counted
as data records from 1 (free-text cells span several physical lines, so a row is not a line);
fixations are named by their line in the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trainable.config import CLASS_NAMES
from trainable.data.split import patient_split
from trainable.errors import DataError

MASTER_SHEET = "master_sheet.csv"
FIXATIONS = "fixations.csv"
# A file `gazetune synth` writes beside master_sheet.csv; the real release has none.
SYNTHETIC_MARK = "SYNTHETIC.txt"
MASTER_COLUMNS = ("dicom_id", "path", "patient_id", *CLASS_NAMES)  # the classes: one-hot columns
X, Y, TIME = "X_ORIGINAL", "Y_ORIGINAL", "Time (in secs)"
FIXATION_COLUMNS = ("DICOM_ID", X, Y, TIME)
# Where the MIMIC-CXR tree may sit below the folder a user names: the folder holding `files/`
# is `.../physionet.org/files/mimic-cxr/2.0.0` in a PhysioNet download.
MIMIC_LAYOUTS = (".", "2.0.0", "mimic-cxr/2.0.0", "files/mimic-cxr/2.0.0",
                 "physionet.org/files/mimic-cxr/2.0.0")


@dataclass(frozen=True)
class Skip:
    """An input that was left out: where it is, and why."""

    source: str  # e.g. "master_sheet.csv row 12", "fixations.csv line 40", a DICOM path
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One usable image of the release."""

    dicom_id: str
    patient_id: str
    dicom: Path
    label: int  # index into CLASS_NAMES
    split: int  # trainable.data.split.TRAIN / VAL / TEST
    points: np.ndarray  # float64 [n, 2] fixations (x, y) in original pixels, viewing order
    times: np.ndarray  # float64 [n] `Time (in secs)` of each fixation
    source: str  # the master-sheet row, for messages

    def on_image(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Fixations inside an image of `shape` (H, W); the reader dropped the off-image marks,
        the far edges are only known once the DICOM is open.

        Shape:
            -> points [m, 2], times [m], m <= n.
        """
        height, width = shape
        inside = (self.points[:, 0] < width) & (self.points[:, 1] < height)
        return self.points[inside], self.times[inside]


@dataclass(frozen=True)
class Release:
    """The images of a release that can be used, and the inputs that could not."""

    records: list[ImageRecord]
    skipped: list[Skip] = field(default_factory=list)
    mimic_root: Path | None = None
    # DICOM_IDs not among the master sheet's (subset's) images: calibration screens, images
    # outside the subset, and any unknown id, which looks just like a calibration screen.
    ignored_fixation_rows: int = 0
    off_image_fixations: int = 0  # dropped: x < 0 or y <= 0, see `_gaze_by_image`


def read_release(
    egd_root: str | Path, mimic_root: str | Path, subset: str | Path | None = None
) -> Release:
    """Read master sheet and fixations; pair each image with its fixations and split.

    Args:
        egd_root: the folder holding `master_sheet.csv` and `fixations.csv`.
        mimic_root: the MIMIC-CXR 2.0.0 folder holding `files/` (or a folder above it, see
            MIMIC_LAYOUTS). DICOM files are not opened here.
        subset: optional file of image names to keep (Watanabe et al.'s `filenames.csv`):
            dicom ids, `<dicom_id>.dcm` or paths, in its last column.

    Returns:
        The release; the split is `patient_split` over the master-sheet rows in file order
        (after the subset filter, before row-level skips, so a skipped row moves no patient).

    Raises:
        DataError: a table that is missing, unreadable or lacks a required column, a MIMIC
            root without `files/pXX` folders, or a subset name not in the master sheet.
    """
    egd_root = Path(egd_root)
    master = _read_table(egd_root / MASTER_SHEET, MASTER_COLUMNS)
    fixations = _read_table(egd_root / FIXATIONS, FIXATION_COLUMNS)
    if subset is not None:
        master = master[master["dicom_id"].isin(_read_subset(Path(subset), master))]
    splits = patient_split(master["patient_id"].tolist())
    root = resolve_mimic_root(Path(mimic_root))
    selected = fixations["DICOM_ID"].isin(set(master["dicom_id"]))
    gaze, bad_fixations, off_image = _gaze_by_image(fixations[selected])

    records, skipped, first_row = [], [], {}
    labels = _labels(master)
    rows = zip(master.index, master.to_dict("records"), splits, labels, strict=True)
    for index, row, split, label in rows:
        source = f"{MASTER_SHEET} row {index + 1}"
        dicom_id = row["dicom_id"]
        first = first_row.setdefault(dicom_id, index + 1)
        problem = _row_problem(row, label, first if first != index + 1 else None)
        dicom = root / row["path"]
        # Lexically, so that a MIMIC root of symlinks into a data store still works.
        if problem is None and not Path(os.path.normpath(dicom)).is_relative_to(root):
            problem = f"path {row['path']!r} leads outside the MIMIC-CXR root"
        if problem is None and dicom_id not in gaze:
            problem = f"no on-image fixation in {FIXATIONS}"
        if problem is not None:
            skipped.append(Skip(source, problem))
            continue
        points, times = gaze[dicom_id]
        records.append(ImageRecord(
            dicom_id=dicom_id, patient_id=row["patient_id"], dicom=dicom,
            label=int(np.argmax(label)), split=int(split), points=points, times=times,
            source=source,
        ))
    return Release(records, skipped + bad_fixations, root, int((~selected).sum()), off_image)


def resolve_mimic_root(root: Path) -> Path:
    """The folder under `root` whose `files/` holds the pXX patient groups."""
    for layout in MIMIC_LAYOUTS:
        candidate = root / layout
        if any((candidate / "files").glob("p[0-9][0-9]")):
            return candidate.resolve()
    raise DataError(
        f"{root}: no MIMIC-CXR files/pXX folders found in it or in "
        f"{', '.join(MIMIC_LAYOUTS[1:])} below it"
    )


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """The required columns of a CSV file as stripped strings (ids stay exactly as written)."""
    try:
        # index_col=False: when the first data row has more fields than the header, pandas
        # would otherwise take the surplus as an index and shift every column of every row.
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            index_col=False, usecols=lambda column: column in required)
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such file") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable CSV ({err})") from err
    except OSError as err:  # a folder in its place, no permission
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(map(repr, missing))}")
    return table.apply(lambda column: column.str.strip())


def _read_subset(path: Path, master: pd.DataFrame) -> set[str]:
    """Dicom ids named by a subset file; every name must be in the master sheet."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            index_col=False)
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such subset file") from err
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable subset file ({err})") from err
    column = "filename" if "filename" in table.columns else table.columns[-1]
    names = {_dicom_id(name) for name in table[column] if name.strip()}
    unknown = sorted(names - set(master["dicom_id"]))
    if unknown:
        raise DataError(
            f"{path}: {len(unknown)} name(s) not in {MASTER_SHEET}, e.g. {unknown[0]!r}"
        )
    return names


def _dicom_id(name: str) -> str:
    """`<dicom_id>`, `<dicom_id>.dcm` or a path to it -> `<dicom_id>`."""
    stem = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    return stem[:-4] if stem.lower().endswith(".dcm") else stem


def _labels(master: pd.DataFrame) -> np.ndarray:
    """The label columns as numbers (NaN where a cell is not a number). Shape: [N, 3]."""
    return master[list(CLASS_NAMES)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)


def _row_problem(row: dict, label: np.ndarray, first_row: int | None) -> str | None:
    """Why a master-sheet row cannot be used, or None."""
    for column in ("dicom_id", "path", "patient_id"):
        if not row[column]:
            return f"empty {column}"
    if first_row is not None:
        return f"duplicate dicom_id (first at row {first_row})"
    if not (np.isin(label, (0.0, 1.0)).all() and label.sum() == 1.0):
        cells = ", ".join(f"{name}={row[name]!r}" for name in CLASS_NAMES)
        return f"label not one-hot ({cells})"
    return None


def _gaze_by_image(fixations: pd.DataFrame) -> tuple[dict, list[Skip], int]:
    """Fixation points and times per dicom id, file order kept; bad rows skipped by line.

    Returns:
        {dicom_id: (points [n, 2], times [n])}, the skipped rows, the number of fixations
        dropped as off-image.
    """
    numbers = fixations[[X, Y, TIME]].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    # 'inf' and '1e400' parse as numbers, but no pixel or time is infinite.
    bad = ~np.isfinite(numbers).all(axis=1)
    skipped = []
    for index in np.flatnonzero(bad.to_numpy()):
        row, parsed = fixations.iloc[index], numbers.iloc[index]
        column = next(c for c in (X, Y, TIME) if not np.isfinite(parsed[c]))
        line = fixations.index[index] + 2  # header is line 1; no fixation cell spans lines
        what = "not a number" if np.isnan(parsed[column]) else "not finite"
        skipped.append(Skip(f"{FIXATIONS} line {line}", f"{column} {row[column]!r} is {what}"))
    values = numbers[~bad].to_numpy(np.float64)
    # The authors' mapping turns an off-image gaze into (-1, -1) before scaling, which truncates
    # to small negatives on full-size images and to (0, 0) below 1080 pixels; their heatmap
    # keeps a fixation only when y > 0. The same rule here.
    off_image = (values[:, 0] < 0) | (values[:, 1] <= 0)
    values = values[~off_image]
    # Group rows by image with a stable sort (a pandas groupby costs ~5 ms per group here).
    codes, ids = pd.factorize(fixations["DICOM_ID"].to_numpy()[~bad.to_numpy()][~off_image])
    order = np.argsort(codes, kind="stable")
    # Without any fixation, np.split would still return one (empty) group.
    bounds = np.cumsum(np.bincount(codes, minlength=len(ids)))[:-1]
    groups = np.split(values[order], bounds) if len(ids) else []
    gaze = {dicom_id: (group[:, :2], group[:, 2])
            for dicom_id, group in zip(ids, groups, strict=True)}
    return gaze, skipped, int(off_image.sum())
