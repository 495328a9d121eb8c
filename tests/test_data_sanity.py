"""Data sanity at the door: a cache, a release or a prepare option that cannot give a correct
training is refused in one line naming the file, row or option, before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from trainable.data.cache import DATASET, MANIFEST, load_cache, prepare
from trainable.data.egd import MASTER_SHEET, read_release
from trainable.errors import DataError


@pytest.fixture
def cache(small_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(small_cache, copy)
    return copy


def rewrite_dataset(cache, **changes):
    with np.load(cache / DATASET, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    np.savez(cache / DATASET, **arrays)


@pytest.mark.parametrize("manifest", [[], None, "text"])
def test_a_manifest_that_is_not_an_object(cache, manifest):
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{MANIFEST}: not a manifest"):
        load_cache(cache)


def test_an_npy_renamed_to_dataset_npz(cache):
    np.save(cache / "x.npy", np.zeros(3))
    (cache / "x.npy").replace(cache / DATASET)
    with pytest.raises(DataError, match=rf"{DATASET}: incomplete or corrupt \(a single array"):
        load_cache(cache)


def test_labels_that_are_not_one_hot(cache):
    labels = np.load(cache / DATASET)["labels"]
    rewrite_dataset(cache, labels=np.zeros_like(labels))
    with pytest.raises(DataError, match="labels must be one-hot"):
        load_cache(cache)
    rewrite_dataset(cache, labels=np.ones_like(labels))
    with pytest.raises(DataError, match="labels must be one-hot"):
        load_cache(cache)


@pytest.mark.parametrize("name, bad", [
    ("images", lambda a: a[..., None]),  # rank 4
    ("split", lambda a: a.astype(np.float32)),  # wrong kind
    ("images", lambda a: a * np.float16(np.nan)),  # NaN pixels
    ("split", lambda a: a + 5),  # unknown split code
])
def test_arrays_of_the_wrong_rank_type_or_values(cache, name, bad):
    rewrite_dataset(cache, **{name: bad(np.load(cache / DATASET)[name])})
    with pytest.raises(DataError, match=rf"{DATASET}: .*{name}"):
        load_cache(cache)


def test_a_manifest_whose_size_disagrees_with_the_arrays(cache):
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["images"] += 1
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{MANIFEST} says {manifest['images']} images"):
        load_cache(cache)


def test_a_master_sheet_path_outside_the_mimic_root_is_skipped(small_dataset, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(small_dataset, release)
    sheet = release / "egd-cxr" / MASTER_SHEET
    text = sheet.read_text().splitlines()
    header = text[0].split(",")
    first = text[1].split(",")
    first[header.index("path")] = "../../../etc/x.dcm"
    sheet.write_text("\n".join([text[0], ",".join(first), *text[2:]]) + "\n")
    loaded = read_release(release / "egd-cxr", release / "mimic-cxr")
    reasons = [s.reason for s in loaded.skipped if s.source == f"{MASTER_SHEET} row 1"]
    assert reasons == ["path '../../../etc/x.dcm' leads outside the MIMIC-CXR root"]
    assert all(r.dicom.is_relative_to(loaded.mimic_root) for r in loaded.records)


def test_a_folder_in_place_of_the_master_sheet(small_dataset, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(small_dataset, release)
    (release / "egd-cxr" / MASTER_SHEET).unlink()
    (release / "egd-cxr" / MASTER_SHEET).mkdir()
    with pytest.raises(DataError, match=rf"{MASTER_SHEET}: cannot be read"):
        read_release(release / "egd-cxr", release / "mimic-cxr")


@pytest.mark.parametrize("option, value", [
    ("sigma", 0.0), ("sigma", -5.0), ("sigma", float("nan")), ("sigma", float("inf")),
    ("size", 0), ("size", 5000), ("workers", -1),
])
def test_prepare_options_out_of_range_are_refused_before_any_write(small_dataset, tmp_path,
                                                                   option, value):
    with pytest.raises(DataError, match=rf"prepare: --{option} must be"):
        prepare(small_dataset / "egd-cxr", small_dataset / "mimic-cxr", tmp_path / "cache",
                **{option: value})
    assert not (tmp_path / "cache").exists()
