"""Bad input gets a clear message naming the file, row or key, and leaves nothing half-written.

Covered elsewhere, not repeated here:
- a missing required column, named (test_egd.py::test_a_missing_required_column_fails_at_once_
  naming_it; on the command line, one line and exit 2: test_cache.py::test_a_missing_column_
  is_one_line_on_the_cli_without_traceback);
- non-numeric coordinates, labels that are not one-hot, an empty patient id, an image without
  fixations, a dicom id repeated after an unusable row (test_egd.py::test_row_problems_are_
  skipped_and_named), every fixation beyond the image (test_cache.py::test_unusable_inputs_
  are_skipped_and_named);
- a subset file naming unknown images, as read (test_egd.py::test_subset_file_in_watanabes_
  format);
- a cache from another preprocessing version, or half a dataset (test_cache.py::test_load_
  cache_refuses_missing_partial_and_mismatched_caches); --on-error fail writes no dataset
  (test_cache.py::test_on_error_fail_writes_no_dataset_and_the_cli_exits_non_zero);
- config keys by `TrialConfig.from_dict` (test_train.py::test_config_errors_name_the_key).

Decided here: fixations whose DICOM_ID is not in the master sheet are ignored like the release's
calibration screens (which look exactly like that), counted in `ignored_fixation_rows` of the
release and of the cache manifest, and leave no trace in the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_fixtures import fake_images, random_id, tables, write_release, write_subset
from helpers import gazetune
from identifiers import scan_for_identifiers

from trainable.data import load_cache, prepare, read_release
from trainable.errors import DataError

WRITTEN = ("dataset.npz", "manifest.json")


@pytest.fixture
def data():
    return tables(fake_images(9))


def prepare_small(egd: Path, mimic: Path, cache: Path, **options):
    return prepare(egd, mimic, cache, size=16, workers=1, **options)


def cache_files(cache: Path) -> dict[str, bytes]:
    """Every file of a cache folder (temporary ones included) with its bytes."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file()}


def swap_tables(egd: Path, data) -> tuple[str, str]:
    """master_sheet.csv and fixations.csv exchanged: every required column is 'missing'."""
    master, fixations = egd / "master_sheet.csv", egd / "fixations.csv"
    texts = master.read_bytes(), fixations.read_bytes()
    master.write_bytes(texts[1])
    fixations.write_bytes(texts[0])
    return "master_sheet.csv", "missing required column(s) 'dicom_id', 'path', 'patient_id'"


def unknown_subset(egd: Path, data) -> tuple[str, str]:
    write_subset(egd / "filenames.csv", [data.images[0].dicom_id, "0000-not-in-the-release"])
    return "filenames.csv", "1 name(s) not in master_sheet.csv, e.g. '0000-not-in-the-release'"


def latin1_master(egd: Path, data) -> tuple[str, str]:
    master = egd / "master_sheet.csv"
    master.write_bytes(master.read_bytes().replace(b"dyspnea", "dyspn\u00e9e".encode("latin-1")))
    return "master_sheet.csv", "unreadable CSV ('utf-8' codec can't decode byte 0xe9"


def empty_master(egd: Path, data) -> tuple[str, str]:
    (egd / "master_sheet.csv").write_bytes(b"")
    return "master_sheet.csv", "unreadable CSV (No columns to parse from file)"


def header_only_fixations(egd: Path, data) -> tuple[str, str]:
    """An empty fixation set: every image is skipped, each named, and nothing is usable."""
    fixations = egd / "fixations.csv"
    fixations.write_text(fixations.read_text().splitlines()[0] + "\n")
    return "", "no usable image in {egd}: master_sheet.csv row 1: no on-image fixation in "


def no_label_at_all(egd: Path, data) -> tuple[str, str]:
    for row in range(len(data.master)):
        for label in ("Normal", "CHF", "pneumonia"):
            data.set("master", row, label, "0")
    write_release(egd.parent, data, dicoms=False)
    return "", ("no usable image in {egd}: master_sheet.csv row 1: label not one-hot "
                "(Normal='0', CHF='0', pneumonia='0')")


@pytest.mark.parametrize("damage", [swap_tables, unknown_subset, latin1_master, empty_master,
                                    header_only_fixations, no_label_at_all])
def test_a_bad_table_stops_prepare_naming_it_and_leaves_the_cache_as_it_was(
    tmp_path, data, damage
):
    egd, mimic = write_release(tmp_path / "release", data)
    kept, fresh = tmp_path / "kept", tmp_path / "fresh"
    prepare_small(egd, mimic, kept)  # a good cache from before, in the same folder
    before = cache_files(kept)
    table, reason = damage(egd, data)
    subset = egd / "filenames.csv" if table == "filenames.csv" else None
    expected = f"{egd / table}: {reason}" if table else reason.format(egd=egd)
    for cache in (kept, fresh):
        with pytest.raises(DataError) as caught:
            prepare_small(egd, mimic, cache, subset=subset)
        assert str(caught.value).startswith(expected), caught.value
    assert cache_files(kept) == before  # nothing replaced, nothing half-written, no temp file
    assert not any((fresh / name).exists() for name in WRITTEN)
    if table:  # the tables are read before the cache folder is even created
        assert not fresh.exists()


def test_the_cli_reports_a_bad_table_in_one_line_with_exit_code_2(tmp_path, data):
    egd, mimic = write_release(tmp_path / "release", data, dicoms=False)
    header_only_fixations(egd, data)
    result = gazetune("prepare", "--egd-root", str(egd), "--mimic-root", str(mimic),
                      "--cache", str(tmp_path / "cache"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith(f"gazetune prepare: no usable image in {egd}: master_sheet.csv row 1")
    assert not (tmp_path / "cache" / "dataset.npz").exists()


def test_fixations_of_unknown_images_are_ignored_counted_and_leave_no_trace(tmp_path, data):
    egd, mimic = write_release(tmp_path / "clean", data)
    prepare_small(egd, mimic, tmp_path / "clean-cache")
    rng = np.random.default_rng(1)
    strangers = [random_id(rng), random_id(rng), "", "\u00e9\u65e5-id", "x" * 500]
    template = data.fixations[0]
    extra = []
    for stranger in strangers:
        row = list(template)
        row[data.fixation_header.index("DICOM_ID")] = stranger
        extra.append(row)
    data.fixations[3:3] = extra[:2]  # among an image's fixations, and at the end
    data.fixations += extra[2:]
    egd, _ = write_release(tmp_path / "noisy", data, dicoms=False)
    summary = prepare_small(egd, mimic, tmp_path / "cache")

    clean = load_cache(tmp_path / "clean-cache")
    cache = load_cache(tmp_path / "cache")
    assert summary.skipped == [] and len(cache) == len(data.images)
    assert (cache.manifest["ignored_fixation_rows"]
            == clean.manifest["ignored_fixation_rows"] + len(strangers))
    for name in ("images", "heatmaps", "fixations", "labels", "split"):
        assert np.array_equal(getattr(cache, name), getattr(clean, name)), name
    assert scan_for_identifiers([tmp_path / "cache"], strangers[:2]) == []


def test_a_repeated_usable_dicom_id_is_used_once(tmp_path, data):
    data.master.append(list(data.master[4]))  # row 10 repeats row 5, which is usable
    egd, mimic = write_release(tmp_path / "release", data)
    summary = prepare_small(egd, mimic, tmp_path / "cache")
    assert [(s.source, s.reason) for s in summary.skipped] == [
        ("master_sheet.csv row 10", "duplicate dicom_id (first at row 5)")]
    cache = load_cache(tmp_path / "cache")
    assert len(cache) == 9 and len(set(cache.uids)) == 9


def test_read_release_survives_tables_without_rows(tmp_path, data):
    """Found by fuzzing: an empty fixation table crashed the grouping of fixations."""
    egd, mimic = write_release(tmp_path, data, dicoms=False)
    header_only_fixations(egd, data)
    release = read_release(egd, mimic)
    assert release.records == [] and len(release.skipped) == 9
    (egd / "master_sheet.csv").write_text(",".join(data.master_header) + "\n")
    assert read_release(egd, mimic).records == []


def test_a_surplus_field_in_the_first_row_shifts_no_column(tmp_path, data):
    """Found by fuzzing: pandas took a surplus field of the first data row as an index and
    silently shifted every column of every row."""
    data.master[0].append("surplus")
    egd, mimic = write_release(tmp_path, data, dicoms=False)
    release = read_release(egd, mimic)
    assert [r.dicom_id for r in release.records] == [i.dicom_id for i in data.images]
    assert [r.source for r in release.records][:2] == ["master_sheet.csv row 1",
                                                       "master_sheet.csv row 2"]


def test_infinite_coordinates_are_skipped_and_named(tmp_path, data):
    """Found by fuzzing: 'inf' and '1e400' parse as numbers; no pixel is infinite."""
    column = data.fixation_header.index("X_ORIGINAL")
    data.fixations[0][column] = "1e400"
    egd, mimic = write_release(tmp_path, data, dicoms=False)
    release = read_release(egd, mimic)
    assert [(s.source, s.reason) for s in release.skipped] == [
        ("fixations.csv line 2", "X_ORIGINAL '1e400' is not finite")]
    assert all(np.isfinite(r.points).all() for r in release.records)


@pytest.mark.parametrize("argument, message", [
    ("lerning_rate=1", "unknown config key(s) lerning_rate; known keys: cache, "),
    ("epochs=three", "config key 'epochs': 'three' is not a int"),
])
def test_a_bad_config_key_is_one_line_with_exit_code_2(tmp_path, argument, message):
    result = gazetune("train", argument, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"gazetune train: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # refused before MLflow wrote a store or a run
