"""The EGD-CXR reader on hand-made edge cases and on a synthetic release."""

import re

import numpy as np
import pytest
from data_fixtures import fake_images, tables, write_release, write_subset

from trainable.data import patient_split, read_release
from trainable.data.egd import resolve_mimic_root
from trainable.errors import DataError


@pytest.fixture
def data():
    return tables(fake_images(9))


def test_reads_images_labels_fixations_and_ignores_calibration(tmp_path, data):
    egd, mimic = write_release(tmp_path, data)
    release = read_release(egd, mimic)
    assert release.skipped == []
    assert [r.dicom_id for r in release.records] == [i.dicom_id for i in data.images]
    assert [r.label for r in release.records] == [("Normal", "CHF", "pneumonia").index(i.label)
                                                  for i in data.images]
    assert release.ignored_fixation_rows == 3  # the calibration screens (ids not in the sheet)
    assert release.off_image_fixations == 9  # one (0, 0) or (-1, -2) per image
    first, image = release.records[0], data.images[0]
    assert first.dicom.is_file() and first.dicom == (mimic / image.path).resolve()
    on_screen = [p for p in image.points if p[0] >= 0 and p[1] > 0]
    assert first.points.tolist() == [list(p) for p in on_screen]  # (x, y) in file order
    assert first.times.shape == (len(on_screen),) and np.all(np.diff(first.times) > 0)
    # x = W is past the last column: only the opened DICOM's size can drop it.
    points, times = first.on_image(image.shape)
    assert len(points) == len(on_screen) - 1 and len(times) == len(points)
    assert points[:, 0].max() < image.shape[1]


def test_split_is_the_patient_split_of_master_sheet_order(tmp_path, data):
    release = read_release(*write_release(tmp_path, data, dicoms=False))
    expected = patient_split([i.patient_id for i in data.images])
    assert [r.split for r in release.records] == expected.tolist()
    assert release.records[0].split == release.records[1].split  # one patient, two images


@pytest.mark.parametrize("table, column, file", [
    ("master", "CHF", "master_sheet.csv"),
    ("master", "path", "master_sheet.csv"),
    ("fixations", "X_ORIGINAL", "fixations.csv"),
    ("fixations", "Time (in secs)", "fixations.csv"),
])
def test_a_missing_required_column_fails_at_once_naming_it(tmp_path, data, table, column, file):
    data.drop_column(table, column)
    egd, mimic = write_release(tmp_path, data, dicoms=False)
    message = f"{file}: missing required column(s) '{column}'"
    with pytest.raises(DataError, match=re.escape(message)):
        read_release(egd, mimic)


def test_row_problems_are_skipped_and_named(tmp_path, data):
    data.set("master", 1, "Normal", "1")  # a pneumonia row that is Normal too
    data.set("master", 2, "pneumonia", "yes")
    data.set("master", 3, "patient_id", "")
    data.master.append(list(data.master[1]))  # row 10 repeats row 2's (unusable) dicom_id
    lonely = data.images[4].dicom_id
    data.fixations = [row for row in data.fixations if row[2] != lonely]
    bad_line = 7
    data.fixations[bad_line - 2][data.fixation_header.index("Y_ORIGINAL")] = "n/a"
    egd, mimic = write_release(tmp_path, data, dicoms=False)
    release = read_release(egd, mimic)
    reasons = {skip.source: skip.reason for skip in release.skipped}
    assert reasons == {
        "master_sheet.csv row 2": "label not one-hot (Normal='1', CHF='0', pneumonia='1')",
        "master_sheet.csv row 3": "label not one-hot (Normal='1', CHF='0', pneumonia='yes')",
        "master_sheet.csv row 4": "empty patient_id",
        "master_sheet.csv row 5": "no on-image fixation in fixations.csv",
        "master_sheet.csv row 10": "duplicate dicom_id (first at row 2)",
        f"fixations.csv line {bad_line}": "Y_ORIGINAL 'n/a' is not a number",
    }
    assert len(release.records) == 9 - 4
    # The skipped rows still count for the split: no other patient changes split.
    codes = patient_split([row[data.master_header.index("patient_id")] for row in data.master])
    kept = {r.dicom_id: r.split for r in release.records}
    assert kept[data.images[0].dicom_id] == codes[0] and kept[data.images[8].dicom_id] == codes[8]


def test_subset_file_in_watanabes_format(tmp_path, data):
    egd, mimic = write_release(tmp_path, data, dicoms=False)
    chosen = data.images[2:7]
    names = [chosen[0].dicom_id, f"{chosen[1].dicom_id}.dcm", chosen[2].path,
             chosen[3].dicom_id, f" {chosen[4].dicom_id}.DCM "]
    write_subset(tmp_path / "filenames.csv", names)
    assert (tmp_path / "filenames.csv").read_bytes().startswith(b"\xef\xbb\xbf,filename\r\n")
    release = read_release(egd, mimic, subset=tmp_path / "filenames.csv")
    assert [r.dicom_id for r in release.records] == [i.dicom_id for i in chosen]
    expected = patient_split([i.patient_id for i in chosen])  # split after the subset filter
    assert [r.split for r in release.records] == expected.tolist()

    write_subset(tmp_path / "unknown.csv", [chosen[0].dicom_id, "0000-not-an-image"])
    with pytest.raises(DataError, match=r"unknown.csv: 1 name\(s\) not in master_sheet.csv, "
                                        r"e.g. '0000-not-an-image'"):
        read_release(egd, mimic, subset=tmp_path / "unknown.csv")


def test_mimic_root_may_be_the_physionet_download_folder(tmp_path, data):
    egd, mimic = write_release(tmp_path / "egd", data, dicoms=False)
    download = tmp_path / "dl"
    deep = download / "physionet.org" / "files" / "mimic-cxr" / "2.0.0" / "files" / "p10"
    deep.mkdir(parents=True)
    assert resolve_mimic_root(download) == deep.parent.parent.resolve()
    assert resolve_mimic_root(mimic) == mimic.resolve()
    with pytest.raises(DataError, match="no MIMIC-CXR files/pXX folders"):
        read_release(egd, tmp_path / "egd")


def test_missing_table_is_a_data_error(tmp_path, data):
    egd, mimic = write_release(tmp_path, data, dicoms=False)
    (egd / "fixations.csv").unlink()
    with pytest.raises(DataError, match=r"fixations\.csv: no such file"):
        read_release(egd, mimic)


def test_reads_a_synthetic_release_and_its_subset(small_dataset):
    egd, mimic = small_dataset / "egd-cxr", small_dataset / "mimic-cxr"
    release = read_release(egd, mimic)
    assert release.skipped == [] and len(release.records) == 60
    assert all(r.dicom.is_file() and len(r.points) > 0 for r in release.records)
    assert {r.label for r in release.records} == {0, 1, 2}
    subset = read_release(egd, mimic, subset=egd / "filenames.csv")
    assert 0 < len(subset.records) < 60 and subset.skipped == []
