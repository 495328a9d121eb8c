"""The identifier scan (tests/identifiers.py): it finds what is planted, in every form a file can
hide it, finds nothing in a prepared cache, and nothing in what `gazetune train` writes."""

from __future__ import annotations

import csv
import gzip
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from identifiers import scan_for_identifiers
from PIL import Image
from PIL.PngImagePlugin import PngInfo

DICOM_ID = "8c1a4f2e-03b2d7a1-5e9f0c44-2d6b8a13-9f7e1c05"
PATIENT_ID, STUDY_ID = "14508217", "57719034"
OTHER_DICOM_ID = "0f2e9d1c-7b3a5e68-c4d2a9f1-36e8b05d-a1c7f420"


def release_identifiers(egd: Path) -> list[str]:
    """dicom_id, patient_id and study_id of every image of a (synthetic) release."""
    with open(egd / "master_sheet.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    return [row[key] for row in rows for key in ("dicom_id", "patient_id", "study_id")]


def sqlite_with_split_value(identifier: str) -> bytes:
    """A SQLite database whose one long value holds `identifier` across two overflow pages,
    so that its raw bytes do not contain it in one piece (only a dump of the table does)."""
    for before in range(0, 9000, len(identifier) // 2):
        db = sqlite3.connect(":memory:")
        db.execute("create table tags (key text, value text)")
        db.execute("insert into tags values ('image', ?)",
                    ("x" * before + identifier + "y" * (9000 - before),))
        db.commit()
        data = db.serialize()
        db.close()
        if identifier.encode() not in data:
            return data
    raise AssertionError("SQLite kept the identifier in one piece at every offset")


def test_finds_identifiers_planted_in_every_form(tmp_path):
    plant = tmp_path / "planted"
    (plant / "deep" / "er").mkdir(parents=True)
    expected = set()

    def planted(name: str, identifier: str) -> Path:
        expected.add((plant / name, identifier))
        return plant / name

    planted("params.csv", DICOM_ID).write_text(f"key,value\nimage,{DICOM_ID.upper()}\n")
    escaped = "".join(f"\\u{ord(c):04x}" for c in PATIENT_ID)  # what json.dumps may write
    planted("deep/er/config.json", PATIENT_ID).write_text(f'{{"note": "p{escaped}"}}')
    info = PngInfo()
    info.add_text("Title", f"study {STUDY_ID}", zip=True)  # a zTXt chunk: deflated text
    Image.new("L", (8, 8)).save(planted("figure.png", STUDY_ID), pnginfo=info)
    np.savez_compressed(planted("arrays.npz", OTHER_DICOM_ID),  # UTF-32 inside deflate
                        uids=np.array(["aaaa", OTHER_DICOM_ID]))
    with gzip.open(planted("log.txt.gz", PATIENT_ID), "wt") as file:
        file.write(f"loaded files/p14/p{PATIENT_ID}/\n")
    planted("summary.md", STUDY_ID).write_text(f"study s{STUDY_ID}", encoding="utf-16")
    planted("tracking.db", DICOM_ID).write_bytes(sqlite_with_split_value(DICOM_ID))
    # Clean: digits that merely contain a patient id inside a longer number, binary noise.
    (plant / "metrics.txt").write_text(f"timestamp 1{PATIENT_ID}3\nvalue 0.{STUDY_ID}1\n")
    (plant / "noise.bin").write_bytes(np.random.default_rng(0).bytes(1 << 16))

    identifiers = [DICOM_ID, PATIENT_ID, STUDY_ID, OTHER_DICOM_ID]
    assert set(scan_for_identifiers([plant], identifiers)) == expected
    assert scan_for_identifiers([plant / "metrics.txt", plant / "noise.bin"], identifiers) == []


def test_a_prepared_cache_holds_no_identifier(small_dataset, small_cache):
    identifiers = release_identifiers(small_dataset / "egd-cxr")
    assert len(identifiers) == 3 * 60
    assert scan_for_identifiers([small_cache], identifiers) == []
    # The same scan does see them in the release itself, so the empty result means something.
    found = scan_for_identifiers([small_dataset / "egd-cxr" / "master_sheet.csv"], identifiers)
    assert len(found) == len(set(identifiers))


@pytest.mark.slow  # an MLflow store and one epoch: 1.5 min on the shared 2-core machine
def test_a_logged_training_run_writes_no_identifier(small_dataset, small_cache, tmp_path,
                                                    monkeypatch):
    from mlflow import MlflowClient

    from search.tracking import find_trial_runs, train_logged

    monkeypatch.chdir(tmp_path)  # the embedded defaults: ./mlflow.db and ./mlartifacts
    config = {"cache": str(small_cache), "loss_set": "baseline", "epochs": 1, "batch_size": 8,
                  "n_boot": 100, "figures": 1, "threads": 2}
    train_logged(config, experiment="scan", tracking_uri=None)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["mlartifacts", "mlflow.db"]
    artifacts = {p.suffix for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()}
    assert {".json", ".png", ".pt"} <= artifacts  # config, figures, checkpoint were scanned

    identifiers = release_identifiers(small_dataset / "egd-cxr")
    assert scan_for_identifiers([tmp_path], identifiers) == []
    # A tag that names an image would be found in the store.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = find_trial_runs(uri, "scan")[0]
    MlflowClient(uri).set_tag(run.info.run_id, "source", identifiers[0])
    assert scan_for_identifiers([tmp_path], identifiers) == [(tmp_path / "mlflow.db",
                                                             identifiers[0])]


def test_identifiers_that_share_a_prefix_are_each_found(tmp_path):
    """The scan's single pass nests identifiers by common prefix: one that is the start of
    another (s5000, s50001) and ones that differ in their last character are all found."""
    ids = ["s5000", "s50001", "s50002x", "p1a", "p1b"]
    for name in ids:
        (tmp_path / f"{name}.txt").write_text(f"seen: {name}!")
    (tmp_path / "none.txt").write_text("s500 s5001 p1c")
    found = scan_for_identifiers([tmp_path], ids)
    # "s50001.txt" holds s5000 too, but only where a digit follows it: not a finding.
    assert found == sorted((tmp_path / f"{name}.txt", name) for name in ids)
