"""prepare / load_cache: decoded once, reused, atomic, and honest about what it skipped."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import fake_images, tables, write_release
from helpers import gazetune

from search.cli import main
from trainable.data import load_cache, prepare, read_dicom, read_release, static_heatmap
from trainable.data.cache import PREPROCESS_VERSION, _resize, _uid
from trainable.errors import CacheError, DataError
from trainable.files import atomic_write, opened

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hand_made(tmp_path):
    """Nine tiny images; returns (egd_root, mimic_root, tables)."""
    data = tables(fake_images(9))
    egd, mimic = write_release(tmp_path / "release", data)
    return egd, mimic, data


def test_prepare_writes_arrays_that_match_their_inputs(small_dataset, tmp_path):
    egd, mimic = small_dataset / "egd-cxr", small_dataset / "mimic-cxr"
    summary = prepare(egd, mimic, tmp_path / "cache", size=32, workers=2)
    assert summary.written and summary.skipped == [] and summary.decoded == 60
    cache = load_cache(tmp_path / "cache")
    assert len(cache) == 60 and cache.images.shape == (60, 32, 32)
    assert cache.images.dtype == cache.heatmaps.dtype == np.float16
    assert cache.fixations.dtype == np.uint8 and cache.labels.dtype == np.uint8
    assert cache.split.dtype == np.int8 and cache.images.flags.c_contiguous
    assert cache.images.min() >= 0 and cache.images.max() <= 1 and cache.heatmaps.max() == 1
    assert np.array_equal(cache.labels.sum(axis=1), np.ones(60))

    release = read_release(egd, mimic)
    assert np.array_equal(cache.labels.argmax(axis=1), [r.label for r in release.records])
    assert np.array_equal(cache.split, [r.split for r in release.records])
    for i in (0, 37):
        record, image = release.records[i], read_dicom(release.records[i].dicom)
        points, _ = record.on_image(image.shape)
        expected = static_heatmap(points, image.shape, out_size=(32, 32))
        np.testing.assert_allclose(cache.heatmaps[i], expected, atol=1e-3)  # float16
        np.testing.assert_allclose(cache.images[i], _resize(image, (32, 32)), atol=1e-3)
        assert cache.fixations[i].sum() == len(points)

    manifest = cache.manifest
    assert manifest["version"] == PREPROCESS_VERSION and manifest["params"]["size"] == 32
    assert sum(manifest["counts"][s]["total"] for s in ("train", "val", "test")) == 60
    assert [len(cache.indices(s)) for s in ("train", "val", "test")] == [
        manifest["counts"][s]["total"] for s in ("train", "val", "test")]
    # No identifier leaves the cache: uids are salted hashes, and no dicom id appears anywhere.
    assert all(len(uid) == 16 for uid in cache.uids) and len(set(cache.uids)) == 60
    everything = (tmp_path / "cache" / "dataset.npz").read_bytes()
    everything += (tmp_path / "cache" / "manifest.json").read_bytes()
    assert not any(r.dicom_id.encode() in everything for r in release.records)
    assert not any(r.patient_id.encode() in everything for r in release.records)


def test_rerun_reuses_entries_and_decodes_only_what_changed(hand_made, tmp_path, capsys):
    egd, mimic, data = hand_made
    first = prepare(egd, mimic, tmp_path / "cache", size=16, workers=1)
    before = load_cache(tmp_path / "cache")
    again = prepare(egd, mimic, tmp_path / "cache", size=16, workers=1)
    assert (first.decoded, again.decoded, again.reused) == (9, 0, 9)
    after = load_cache(tmp_path / "cache")
    assert np.array_equal(after.images, before.images) and np.array_equal(after.uids, before.uids)

    touched = mimic / data.images[3].path
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert prepare(egd, mimic, tmp_path / "cache", size=16, workers=1).decoded == 1
    assert prepare(egd, mimic, tmp_path / "cache", size=24, workers=1).decoded == 9
    assert load_cache(tmp_path / "cache").images.shape == (9, 24, 24)
    assert "prepare: 9 images" in capsys.readouterr().out


def test_unusable_inputs_are_skipped_and_named(hand_made, tmp_path, capsys):
    egd, mimic, data = hand_made
    broken = mimic / data.images[0].path
    broken.write_bytes(broken.read_bytes()[:-100])  # truncated pixel data
    (mimic / data.images[1].path).unlink()
    width = data.images[2].shape[1]
    x_column = data.fixation_header.index("X_ORIGINAL")
    for row in data.fixations:  # every fixation of image 2 beyond its right edge
        if row[2] == data.images[2].dicom_id and int(row[x_column]) >= 0:
            row[x_column] = str(width + 5)
    data.set("master", 3, "Normal", "1")  # a CHF row that is Normal too
    egd, mimic = write_release(tmp_path / "release", data, dicoms=False)

    summary = prepare(egd, mimic, tmp_path / "cache", size=16, workers=2)
    reasons = {s.source: s.reason for s in summary.skipped}
    assert set(reasons) == {f"master_sheet.csv row {i}" for i in (1, 2, 3, 4)}
    assert str(broken) in reasons["master_sheet.csv row 1"]
    assert "less than expected" in reasons["master_sheet.csv row 1"]
    assert "no such DICOM file" in reasons["master_sheet.csv row 2"]
    assert "no fixation inside the" in reasons["master_sheet.csv row 3"]
    assert "label not one-hot" in reasons["master_sheet.csv row 4"]
    printed = capsys.readouterr().out
    assert "skipped 4 input(s):" in printed and "master_sheet.csv row 2" in printed
    cache = load_cache(tmp_path / "cache")
    assert len(cache) == 5 and len(cache.manifest["skipped"]) == 4
    # The manifest keeps each reason but names the image by its uid: a path holds MIMIC ids.
    kept = {s["source"]: s["reason"] for s in cache.manifest["skipped"]}
    uid = _uid(cache.manifest["salt"], data.images[0].dicom_id)
    assert kept["master_sheet.csv row 1"] == reasons["master_sheet.csv row 1"].replace(
        str(broken), f"image {uid}")
    assert str(mimic) not in (tmp_path / "cache" / "manifest.json").read_text()
    assert str(broken) in printed  # the terminal summary names the file for the user


def test_on_error_fail_writes_no_dataset_and_the_cli_exits_non_zero(hand_made, tmp_path, capsys):
    egd, mimic, data = hand_made
    (mimic / data.images[5].path).unlink()
    args = ["prepare", "--egd-root", str(egd), "--mimic-root", str(mimic), "--size", "16",
            "--cache", str(tmp_path / "cache"), "--workers", "1"]
    assert main([*args, "--on-error", "fail"]) == 1
    printed = capsys.readouterr().out
    assert "no such DICOM file" in printed and "cache not written" in printed
    assert not (tmp_path / "cache" / "dataset.npz").exists()
    assert len(list((tmp_path / "cache" / "entries").glob("*.npz"))) == 8  # kept for the rerun
    assert main(args) == 0
    assert len(load_cache(tmp_path / "cache")) == 8


def test_a_missing_column_is_one_line_on_the_cli_without_traceback(tmp_path):
    data = tables(fake_images(3))
    data.drop_column("master", "pneumonia")
    egd, mimic = write_release(tmp_path, data, dicoms=False)
    result = gazetune("prepare", "--egd-root", str(egd), "--mimic-root", str(mimic),
                      "--cache", str(tmp_path / "cache"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{egd / 'master_sheet.csv'}: missing required column(s) 'pneumonia'" in result.stderr


def test_a_killed_prepare_leaves_no_entry_that_a_rerun_trusts(tmp_path):
    data = tables(fake_images(24, shapes=((700, 600), (640, 710))))
    egd, mimic = write_release(tmp_path / "release", data)
    cache, entries = tmp_path / "cache", tmp_path / "cache" / "entries"
    code = (f"from trainable.data import prepare; "
            f"prepare({str(egd)!r}, {str(mimic)!r}, {str(cache)!r}, size=64, workers=1)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(entries.glob("*.npz"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (cache / "dataset.npz").exists()  # killed well before the end
    for entry in entries.glob("*.npz"):  # every file under a real name is complete
        with np.load(entry, allow_pickle=False) as arrays:
            assert arrays["heatmap"].shape == (64, 64)
    resumed = prepare(egd, mimic, cache, size=64, workers=1)
    assert resumed.reused >= 3 and resumed.decoded == 24 - resumed.reused
    clean = prepare(egd, mimic, tmp_path / "clean", size=64, workers=2)
    assert clean.decoded == 24
    assert np.array_equal(load_cache(cache).images, load_cache(tmp_path / "clean").images)


def test_damaged_entries_are_rebuilt_and_failed_writes_leave_nothing(hand_made, tmp_path):
    egd, mimic, _ = hand_made
    prepare(egd, mimic, tmp_path / "cache", size=16, workers=1)
    expected = load_cache(tmp_path / "cache").heatmaps
    entry = min((tmp_path / "cache" / "entries").glob("*.npz"))
    entry.write_bytes(entry.read_bytes()[:200])  # damaged on disk after it was written
    (tmp_path / "cache" / "dataset.npz").unlink()
    prepare(egd, mimic, tmp_path / "cache", size=16, workers=1)
    assert np.array_equal(load_cache(tmp_path / "cache").heatmaps, expected)

    def interrupted(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "target.npz", opened(interrupted))
    assert list(tmp_path.glob("*target*")) == []


def test_load_cache_refuses_missing_partial_and_mismatched_caches(hand_made, tmp_path):
    egd, mimic, _ = hand_made
    cache = tmp_path / "cache"
    with pytest.raises(CacheError, match=re.escape(f"{cache}: no manifest.json")):
        load_cache(cache)
    prepare(egd, mimic, cache, size=16, workers=1)
    manifest = json.loads((cache / "manifest.json").read_text())

    (cache / "manifest.json").write_text(json.dumps({**manifest, "version": 0}))
    with pytest.raises(CacheError, match="cache version 0, this code reads version"):
        load_cache(cache)
    (cache / "manifest.json").write_text(json.dumps({**manifest, "input_hash": "other"}))
    with pytest.raises(CacheError, match="come from different prepare runs"):
        load_cache(cache)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    dataset = (cache / "dataset.npz").read_bytes()
    (cache / "dataset.npz").write_bytes(dataset[: len(dataset) // 2])
    with pytest.raises(CacheError, match=r"dataset\.npz: incomplete or corrupt"):
        load_cache(cache)
    assert issubclass(CacheError, DataError)


def test_no_usable_image_is_an_error_and_split_names_are_checked(hand_made, tmp_path):
    egd, mimic, data = hand_made
    for image in data.images:
        (mimic / image.path).unlink()
    with pytest.raises(DataError, match="no usable image"):
        prepare(egd, mimic, tmp_path / "cache", size=16, workers=1)
    write_release(tmp_path / "release", data)
    prepare(egd, mimic, tmp_path / "cache", size=16, workers=1)
    with pytest.raises(KeyError, match="unknown split 'dev'"):
        load_cache(tmp_path / "cache").indices("dev")
